"""Where the embedded Ray head keeps its session (its logs, every job driver's log included)."""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

from service.cluster import MAX_TEMP_DIR, session_dir


def _private(path):
    return stat.S_IMODE(path.stat().st_mode) == 0o700


def test_a_short_data_directory_holds_the_session_privately():
    data = Path(tempfile.mkdtemp(prefix="l", dir="/tmp"))  # pytest's own folders may be too long
    try:
        got = session_dir(data)
        assert got == data.resolve() / "ray-session" and _private(got)
    finally:
        shutil.rmtree(data)


def test_a_long_data_directory_gets_a_short_private_folder_found_again(tmp_path):
    data = tmp_path / ("x" * 60)
    data.mkdir()
    got = session_dir(data)
    assert len(str(got)) <= MAX_TEMP_DIR and _private(got) and not str(got).startswith("/tmp/ray")
    assert session_dir(data) == got  # the same folder for the next head of this data directory
    assert (data / "ray-session").resolve() == got

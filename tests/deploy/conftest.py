"""The deploy tier's shared pieces: one Docker daemon and one build of the CPU image per session
(tests/deploy/docker.py), and the figures they measure, printed at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy import docker


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[docker.Daemon]:
    """A Docker daemon: the session's own (stopped, data root removed, when the session ends) or the
    one LEOCLR_TEST_DOCKER_HOST names (left running)."""
    daemon = docker.start_daemon()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def leoclr_image(docker_daemon: docker.Daemon, tmp_path_factory: pytest.TempPathFactory) -> docker.BuiltImage:
    """The CPU image (leoclr:0.1.0), built once per session by docker/build.sh."""
    image = docker.build_image(docker_daemon, tmp_path_factory.mktemp("image-build"))
    docker.figure(f"image {image.tag}: {image.size_bytes / 1e9:.2f} GB, built in {image.build_seconds:.0f} s "
                  f"({'a fresh' if docker_daemon.owned else 'a reused'} daemon)")
    return image


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if docker.FIGURES:
        terminalreporter.section("deploy figures")
        for line in docker.FIGURES:
            terminalreporter.write_line(line)

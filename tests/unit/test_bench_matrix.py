"""The reference matrix runner (`bench.matrix`, which bench/gpu.sh calls): rows in one
process, under a budget, resumable, a failing row measured again on the plain path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from bench import engine as bench
from bench import matrix as bench_matrix

ROOT = Path(__file__).resolve().parents[2]
# The reference configs, shrunk to something a CPU runs in a second.
TINY = ["--set", "model.backbone=tiny", "--set", "data.image_size=16", "--set", "optim.batch_size=8",
        "--set", "loss.queue_size=64", "--set", "data.synthetic.source_size=40",
        "--steps", "2", "--warmup", "1", "--max-images", "16", "--loader-workers", "0"]
EAGER = ["01-r50-leoclr-eager", "05-r18-leoclr-eager", "07-r18-mocov2-eager"]  # in run order
R18_EAGER = EAGER[1:]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the rows name their specs from the repository root


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


class FakeBench:
    """Stands in for `bench.run_args`: records each call's arguments, writes a record, or fails."""

    def __init__(self, fail=lambda args: False):
        self.calls: list = []
        self.fail = fail

    def __call__(self, args, spec):
        self.calls.append(args)
        if self.fail(args):
            raise RuntimeError("device-side assert triggered")
        args.json.write_text(json.dumps({"config": spec.name, "method": spec.method, "compute_inst_per_s": 1.0}))
        return {}


def test_the_matrix_measures_its_rows_in_one_process_and_they_tabulate(tmp_path):
    rc = bench_matrix.main(["--out", str(tmp_path), "--device", "cpu", "--only", *EAGER, *TINY])

    assert rc == 0
    got = records(tmp_path)
    assert sorted(got) == sorted(EAGER)
    for r in got.values():
        assert r["compute_inst_per_s"] > 0 and r["e2e_inst_per_s"] > 0 and r["backbone"] == "tiny"
    assert got["07-r18-mocov2-eager"]["method"] == "mocov2"
    assert got["07-r18-mocov2-eager"]["spec"]["loss"]["symmetric"] is False  # MoCo-v2 as the matrix means it
    assert got["01-r50-leoclr-eager"]["data"] == "jpeg" and got["01-r50-leoclr-eager"]["profile"]
    log = (tmp_path / "01-r50-leoclr-eager.log").read_text()
    assert "end-to-end:" in log and "[bench +" in log
    table = bench.markdown_table(bench.load_records([tmp_path]))
    assert len(table.splitlines()) == 2 + len(EAGER) and "error" not in table


def test_each_rows_log_is_stamped_from_the_start_of_that_row(tmp_path, monkeypatch):
    """A row's stamps say where its own time went, not the process's: on a clock that moves 100 s
    during each row, every row's first line is at +0.0 s and its last at +100.0 s."""
    now = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def row(args, spec):
        bench.log("row starts")
        now[0] += 100.0
        bench.log("row ends")
        args.json.write_text("{}")

    monkeypatch.setattr(bench, "run_args", row)
    assert bench_matrix.main(["--out", str(tmp_path), "--device", "cpu", "--only", *EAGER]) == 0

    for name in EAGER:
        stamps = [line for line in (tmp_path / f"{name}.log").read_text().splitlines() if line.startswith("[bench")]
        assert stamps == ["[bench +   0.0s] row starts", "[bench + 100.0s] row ends"], (name, stamps)


def test_rows_that_have_a_record_are_not_run_again(tmp_path, monkeypatch):
    fake = FakeBench()
    monkeypatch.setattr(bench, "run_args", fake)
    kept = '{"config": "r50-224", "method": "leoclr", "error": "timed out after 120s"}'
    (tmp_path / f"{EAGER[0]}.json").write_text(kept)

    assert bench_matrix.main(["--out", str(tmp_path), "--device", "cpu", "--only", *EAGER]) == 0

    assert [a.json.stem for a in fake.calls] == EAGER[1:]
    assert (tmp_path / f"{EAGER[0]}.json").read_text() == kept


def test_a_row_the_budget_no_longer_fits_is_recorded_as_skipped(tmp_path, monkeypatch):
    import time

    fake = FakeBench()
    monkeypatch.setattr(bench, "run_args", fake)
    # 100 s budget, started 80 s ago: 20 s left, fewer than any row needs.
    rc = bench_matrix.main(["--out", str(tmp_path), "--device", "cpu", "--budget", "100",
                            "--started", str(time.time() - 80), "--only", *EAGER])

    assert rc == 0 and fake.calls == []
    assert {k: r["error"] for k, r in records(tmp_path).items()} == dict.fromkeys(EAGER, "skipped: time budget")
    assert "skipped: time budget" in bench.markdown_table(bench.load_records([tmp_path]))


def test_a_row_failing_on_the_default_path_is_measured_on_the_plain_one(tmp_path, monkeypatch):
    fake = FakeBench(fail=lambda args: args.prefetch != 0)
    monkeypatch.setattr(bench, "run_args", fake)

    assert bench_matrix.main(["--out", str(tmp_path), "--device", "cpu", "--only", EAGER[0]]) == 0

    first, again = fake.calls
    assert (first.prefetch, first.compile_views) == (2, "auto")
    assert (again.prefetch, again.compile_views) == (0, "off")
    assert "error" not in records(tmp_path)[EAGER[0]]
    assert "device-side assert" in (tmp_path / f"{EAGER[0]}.failed.log").read_text()


def test_a_row_failing_on_both_paths_keeps_its_place_and_the_rest_run(tmp_path, monkeypatch):
    fake = FakeBench(fail=lambda args: args.json.stem == EAGER[0])
    monkeypatch.setattr(bench, "run_args", fake)

    assert bench_matrix.main(["--out", str(tmp_path), "--device", "cpu", "--only", *EAGER]) == 0

    got = records(tmp_path)
    assert got[EAGER[0]]["error"] == f"failed, see {EAGER[0]}.log"
    assert all("error" not in got[i] for i in EAGER[1:])


def fake_gpu(monkeypatch) -> None:
    monkeypatch.setattr(bench, "check_args", lambda args: None)
    monkeypatch.setattr(bench_matrix, "check", lambda opts: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)


def test_on_a_gpu_a_failed_row_ends_the_process_and_the_next_one_measures_it_plainly(tmp_path, monkeypatch):
    # A CUDA error can leave the process unable to use the device: the retry needs a new process.
    fake = FakeBench(fail=lambda args: args.prefetch != 0)
    monkeypatch.setattr(bench, "run_args", fake)
    fake_gpu(monkeypatch)
    argv = ["--out", str(tmp_path), "--device", "cuda", "--only", *R18_EAGER]

    assert bench_matrix.main(argv) == bench_matrix.RESTART
    assert records(tmp_path) == {} and (tmp_path / f"{R18_EAGER[0]}.plain").exists()
    assert bench_matrix.main(argv) == bench_matrix.RESTART  # the second row fails the same way
    assert bench_matrix.main(argv) == 0

    assert [(a.json.stem, a.prefetch) for a in fake.calls] == [
        (R18_EAGER[0], 2), (R18_EAGER[0], 0), (R18_EAGER[1], 2), (R18_EAGER[1], 0)]
    assert all("error" not in r for r in records(tmp_path).values())


def test_on_a_gpu_the_rows_of_each_config_share_a_process_of_their_own(tmp_path, monkeypatch):
    # A ResNet-50 row left enough behind to slow the launch-bound ResNet-18 rows run after it.
    fake = FakeBench()
    monkeypatch.setattr(bench, "run_args", fake)
    fake_gpu(monkeypatch)
    rows = ["01-r50-leoclr-eager", "03-r50-mocov2-eager", "05-r18-leoclr-eager", "07-r18-mocov2-eager"]
    argv = ["--out", str(tmp_path), "--device", "cuda", "--only", *rows]

    assert bench_matrix.main(argv) == bench_matrix.RESTART
    assert sorted(records(tmp_path)) == rows[:2]
    assert bench_matrix.main(argv) == 0
    assert [a.json.stem for a in fake.calls] == rows and sorted(records(tmp_path)) == rows


def test_one_process_for_every_row_when_asked(tmp_path, monkeypatch):
    fake = FakeBench()
    monkeypatch.setattr(bench, "run_args", fake)
    fake_gpu(monkeypatch)

    argv = ["--out", str(tmp_path), "--device", "cuda", "--processes", "one", "--only", *EAGER]
    assert bench_matrix.main(argv) == 0
    assert [a.json.stem for a in fake.calls] == EAGER


def test_no_new_process_for_a_config_whose_rows_no_longer_fit(tmp_path, monkeypatch):
    import time

    now = time.time()
    fake = FakeBench()

    def slow_row(args, spec):  # the ResNet-50 row takes 80 s of a 100 s budget
        monkeypatch.setattr(time, "time", lambda: now + 80)
        return fake(args, spec)

    monkeypatch.setattr(bench, "run_args", slow_row)
    fake_gpu(monkeypatch)
    argv = ["--out", str(tmp_path), "--device", "cuda", "--budget", "100", "--started", str(now), "--only", *EAGER]

    assert bench_matrix.main(argv) == 0  # not 75: a new process would only record them as skipped
    assert [a.json.stem for a in fake.calls] == EAGER[:1]
    assert {k: r.get("error") for k, r in records(tmp_path).items()} == {
        EAGER[0]: None, **dict.fromkeys(R18_EAGER, "skipped: time budget")}


def test_each_row_compiles_as_in_a_process_of_its_own(tmp_path, monkeypatch):
    """Compiled graphs do not carry from row to row (torch.compile's in-memory caches are reset)."""
    from torch._dynamo.utils import counters

    fn = torch.compile(lambda x: x * 2 + 1, backend="eager")
    compiled = []

    def compiling_bench(args, spec):
        before = counters["stats"]["unique_graphs"]
        fn(torch.ones(3))
        compiled.append(counters["stats"]["unique_graphs"] - before)
        args.json.write_text("{}")

    monkeypatch.setattr(bench, "run_args", compiling_bench)
    assert bench_matrix.main(["--out", str(tmp_path), "--device", "cpu", "--only", *EAGER[:2]]) == 0
    assert compiled == [1, 1]


def test_a_row_past_its_limit_is_recorded_and_the_process_exits_124(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from bench import engine as bench
        from bench import matrix as bench_matrix
        bench.run_args = lambda args, spec: time.sleep(30)
        sys.exit(bench_matrix.main(["--out", {str(tmp_path)!r}, "--device", "cpu", "--limit", "1",
                                    "--only", {EAGER[0]!r}, {EAGER[1]!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert done.returncode == bench_matrix.TIMED_OUT, done.stderr
    assert records(tmp_path) == {EAGER[0]: {"config": "r50-224", "method": "leoclr", "compile": False,
                                            "error": "timed out after 1s"}}


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--only", "09-nope"], "--only: no row 09-nope"),
    (["--only", EAGER[0]], "--out is required"),
    (["--out", "x", "--budget", "0"], "--budget and --limit must be > 0"),
])
def test_bad_arguments_are_refused_naming_what_is_wrong(argv, message, capsys):
    assert bench_matrix.main(argv) == 2
    assert message in capsys.readouterr().err



def test_a_row_asked_for_on_the_plain_path_is_not_tried_twice(tmp_path, monkeypatch):
    fake = FakeBench(fail=lambda args: True)
    monkeypatch.setattr(bench, "run_args", fake)

    argv = ["--out", str(tmp_path), "--device", "cpu", "--only", EAGER[0],
            "--prefetch", "0", "--compile-views", "off"]
    assert bench_matrix.main(argv) == 0

    assert len(fake.calls) == 1 and records(tmp_path)[EAGER[0]]["error"] == f"failed, see {EAGER[0]}.log"

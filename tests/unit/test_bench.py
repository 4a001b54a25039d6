"""The throughput bench on CPU: both rates measured, the record and table consistent, bad specs refused."""

import json

import pytest
import torch

from bench.engine import main, markdown_table, summarise_trace
from leoclr_core.data import SyntheticObjects
from leoclr_core.data.jpeg import EncodedImages, collate_jpeg_or_pixels, decode_resize_batch
from leoclr_core.spec.models import SyntheticSpec, load_spec

from .bench_shared import TINY_BENCH_SPEC, one_thread  # noqa: F401 - one_thread is a fixture

# torchvision 0.29 deprecates its JPEG codecs on every call; they are what the GPU box's 0.26 has.
pytestmark = [pytest.mark.filterwarnings("ignore:.*TorchCodec:DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

TINY = {**TINY_BENCH_SPEC, "name": "tiny-bench"}


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(TINY))  # JSON is YAML
    return path


def run(spec_file, tmp_path, *extra):
    out = tmp_path / "result.json"
    args = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--json", str(out), *extra]
    code = main([str(spec_file), *args])
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("data", ["synthetic", "jpeg"])
@pytest.mark.parametrize("method", ["leoclr", "mocov2"])
def test_bench_measures_compute_and_end_to_end_rates(spec_file, tmp_path, capsys, data, method):
    record = run(spec_file, tmp_path, "--data", data, "--set", f"method={method}")
    assert record["compute_inst_per_s"] > 0 and record["e2e_inst_per_s"] > 0
    assert record["ratio"] == pytest.approx(record["e2e_inst_per_s"] / record["compute_inst_per_s"])
    assert record["device_name"] and record["device"] == "cpu"
    assert record["method"] == method and record["data"] == data and record["batch_size"] == 16
    assert record["spec"]["method"] == method and record["spec"]["model"]["width"] == 4
    assert record["torch"] == torch.__version__ and record["date"]
    assert record["loss_finite"] == {"compute": True, "e2e": True}
    # only what the run consumes is rendered: (warm-up + timed steps) x batch, not data.num_images
    assert record["images_prepared"] == 3 * 16
    assert (record["jpeg_kib_per_image"] > 0) if data == "jpeg" else record["jpeg_kib_per_image"] is None
    for phase in record["phases"].values():
        assert phase["steps"] == 2 and phase["seconds"] > 0 and phase["last_loss"] == phase["last_loss"]
    assert "tiny-bench" in capsys.readouterr().out


def test_both_phases_start_from_the_same_weights(spec_file, tmp_path, monkeypatch):
    """The compute-only phase fits one static random batch; the end-to-end phase must not inherit that."""
    import bench.engine as bench

    sums, real = [], bench.train_step

    def spy(method, optimizer, views, m, runtime):
        sums.append(sum(p.detach().double().sum().item() for p in method.query_encoder.parameters()))
        return real(method, optimizer, views, m, runtime)

    monkeypatch.setattr(bench, "train_step", spy)
    run(spec_file, tmp_path)  # 1 warm-up + 2 timed steps per phase
    assert len(sums) == 6 and sums[3] == sums[0] and sums[1] != sums[0]


def test_bench_per_sample_cpu_views_with_jpeg_decoded_in_workers(spec_file, tmp_path):
    per_sample = ["--set", "augment.batched=false", "--set", "augment.device=cpu"]
    record = run(spec_file, tmp_path, "--data", "jpeg", *per_sample)
    assert record["feed"] == "per-sample views in workers + decode in workers"
    assert record["e2e_inst_per_s"] > 0


def test_bench_batched_views_with_jpeg_decoded_in_workers(spec_file, tmp_path):
    record = run(spec_file, tmp_path, "--data", "jpeg", "--decode", "workers")
    assert record["feed"] == "batched views on cpu + decode in workers"
    assert record["e2e_inst_per_s"] > 0 and record["loss_finite"]["e2e"]
    assert "JPEG decoded in workers" in markdown_table([record])


def test_bench_feeds_packed_jpeg_batches_through_loader_workers(spec_file, tmp_path):
    record = run(spec_file, tmp_path, "--data", "jpeg", "--loader-workers", "2")
    assert record["loader_workers"] == 2 and record["feed"] == "batched views on cpu + CPU batch decode"
    assert record["e2e_inst_per_s"] > 0


def test_profile_runs_more_steps_of_each_phase_and_records_them(spec_file, tmp_path, monkeypatch):
    import bench.engine as bench

    calls, real = [], bench.train_step
    monkeypatch.setattr(bench, "train_step", lambda *a: calls.append(1) or real(*a))
    record = run(spec_file, tmp_path, "--profile", "2")
    assert len(calls) == 2 * (1 + 2 + 2)  # per phase: warm-up, timed, profiled
    for phase in ("compute", "e2e"):
        p = record["profile"][phase]
        assert p["steps"] == 2 and p["wall_ms_per_step"] > 0 and p["device_timeline"] is False
    assert run(spec_file, tmp_path)["profile"] is None


def test_trace_summary_splits_device_time_by_stream_and_counts_overlap_once():
    kernel = lambda ts, dur, stream, name: {"cat": "kernel", "ts": ts, "dur": dur, "name": name,
                                            "args": {"stream": stream}}
    events = [
        kernel(0, 600, 7, "conv"), kernel(600, 200, 7, "gemm"),  # the step: 800 us
        kernel(500, 300, 20, "views"),  # a side stream, 200 us of it under the step's kernels
        {"cat": "gpu_memcpy", "ts": 900, "dur": 50, "name": "Memcpy HtoD"},
        {"cat": "cpu_op", "ts": 0, "dur": 5000, "name": "aten::conv2d"},  # host time: not device time
    ]
    p = summarise_trace(events, steps=2, wall_s=2e-3)  # 1 ms a step
    assert p["device_timeline"] and p["wall_ms_per_step"] == pytest.approx(1.0)
    assert p["kernel_ms_per_step_by_stream"] == {"7": pytest.approx(0.4), "20": pytest.approx(0.15)}
    assert p["copy_ms_per_step"] == pytest.approx(0.025)
    assert p["busy_ms_per_step"] == pytest.approx((800 + 50) / 1e3 / 2)  # the union, per step
    assert p["idle_fraction"] == pytest.approx(1 - 0.425)
    assert list(p["top_kernels_ms_per_step"]) == ["conv", "views", "gemm"]
    assert summarise_trace(events[-1:], 2, 2e-3)["device_timeline"] is False


def test_encoded_images_round_trip_within_jpeg_tolerance():
    source = SyntheticObjects(8, 0, "train", SyntheticSpec(source_size=64, object_size=(10, 20)))
    encoded = EncodedImages(source, quality=90)
    assert len(encoded) == 8 and encoded.nbytes < 8 * 3 * 64 * 64  # compressed
    packed, labels, skipped = collate_jpeg_or_pixels([encoded[i] for i in range(8)])
    decoded, failed = decode_resize_batch(packed, 64, "cpu")
    original = torch.stack([source[i][0] for i in range(8)])
    assert decoded.shape == original.shape == (8, 3, 64, 64) and decoded.dtype == torch.uint8 and failed == []
    psnr = 10 * torch.log10(255**2 / (decoded.float() - original.float()).pow(2).mean())
    assert psnr > 28  # quality 90 on these cluttered scenes gives about 32 dB
    assert labels.tolist() == [source[i][1] for i in range(8)] and skipped == 0
    assert torch.equal(EncodedImages(source, decode=True, num_images=2)[1][0], decoded[1])


def test_table_merges_records_and_failures(tmp_path):
    base = {"config": "r18", "device_name": "GPU X", "method": "leoclr", "backbone": "resnet18",
            "image_size": 32, "batch_size": 512, "compile": False, "data": "synthetic",
            "compute_inst_per_s": 20000.0, "e2e_inst_per_s": 15000.0, "ratio": 0.75, "compile_s": None,
            "peak_gpu_mem_gib": 3.25, "phases": {"compute": {"last_loss": 8.1}, "e2e": {"last_loss": float("nan")}}}
    (tmp_path / "01-a.json").write_text(json.dumps(base))
    compiled = {**base, "method": "mocov2", "compile": True, "compile_s": 41.6}
    failed = {"config": "r50", "method": "mocov2", "error": "exit 1, see 03-c.log"}
    (tmp_path / "02-b.json").write_text(json.dumps(compiled))
    (tmp_path / "03-c.json").write_text(json.dumps(failed))
    out = tmp_path / "table.md"
    assert main(["--table", str(tmp_path), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("| config | device |")
    row = "| r18 | GPU X | leoclr | resnet18 | 32 | 512 | off | synthetic | - | " + "20,000 | 15,000 | 0.75 | - | 3.2 | 8.10 / nan |"
    assert row in lines
    assert "| mocov2 |" in lines[3] and "| on |" in lines[3] and "| 42 |" in lines[3]
    assert "| r50 | - | mocov2 |" in lines[4] and "| exit 1, see 03-c.log |" in lines[4]
    assert "| 2 ahead, compiled views |" in markdown_table([{**base, "prefetch": 2, "compile_views": True}])
    assert markdown_table([base]).splitlines()[2] == lines[2]


def test_bad_override_exits_2_naming_the_field(spec_file, capsys):
    assert main([str(spec_file), "--device", "cpu", "--set", "model.widht=4"]) == 2
    assert "model.widht: unknown field" in capsys.readouterr().err


def test_missing_spec_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml"), "--device", "cpu"]) == 2
    assert "cannot read spec file" in capsys.readouterr().err


def test_runs_in_one_process_render_a_data_spec_once(spec_file, monkeypatch):
    """The matrix runs its rows in one process: rows with the same data spec share their images
    instead of rendering them again; another spec (or count) gets its own."""
    import bench.engine as bench

    monkeypatch.setattr(bench, "_SOURCES", {})
    spec = load_spec(spec_file)
    first = bench.bench_images(spec, 16)
    assert bench.bench_images(load_spec(spec_file, ["method=mocov2"]), 16) is first
    other = bench.bench_images(load_spec(spec_file, ["data.seed=5"]), 16)
    assert other is not first and not torch.equal(other[0][0], first[0][0])
    assert len(bench.bench_images(spec, 8)) == 8
    assert len(bench._SOURCES) == bench._KEPT  # the oldest was let go

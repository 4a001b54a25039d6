"""A pretrain job on Ray Train + Ray Data, tracked in MLflow, its encoder registered and pulled back;
then an evaluate job on Ray from the registry; then a worker killed in the middle of a run.

The module's Ray node and drivers have a real S3 server's variables (SeaweedFS, tests/backends.py):
the killed-worker and dead-driver runs keep their checkpoints on S3 and restore from there, one image
folder and one Parquet dataset are read from S3 (with k-NN on their test splits there); the other
runs use local storage and data.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from leoclr_core.cli import app
from leoclr_core.settings import core_settings
from tests.backends import S3_SECRET

from .conftest import tiny_spec, upload

pytestmark = [pytest.mark.ray, pytest.mark.slow]
runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _mlflow():
    from leoclr_core import tracking

    return tracking.client()


@pytest.fixture(scope="module")
def ray_node_env(s3):
    """The module's Ray node gets the S3 server's endpoint and key pair from its environment."""
    return s3.env()


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    """One bucket for the module, a prefix per test (SeaweedFS gives every bucket volumes of its own)."""
    return s3.bucket("ray")


def _kept_checkpoints(s3, bucket: str, prefix: str) -> list[str]:
    """The checkpoint folders Ray Train keeps under s3://bucket/prefix (each with its file)."""
    return sorted(k.split("/")[-2] for k in s3.keys(bucket, prefix + "/") if k.endswith("/checkpoint.pt"))


def _assert_no_secret(s3, bucket: str, prefix: str, run_id: str, out: Path, *outputs: str) -> None:
    """The S3 secret is nowhere a user or the service reads: the driver's output, the run folder,
    the MLflow run's params and tags, and what Ray Train wrote beside the checkpoints."""
    assert all(S3_SECRET not in o for o in outputs)
    assert [p for p in out.rglob("*") if p.is_file() and S3_SECRET.encode() in p.read_bytes()] == []
    data = _mlflow().get_run(run_id).data
    assert S3_SECRET not in json.dumps([data.params, data.tags])
    client = s3.client()
    keys = s3.keys(bucket, prefix + "/")
    assert keys
    for key in keys:
        assert S3_SECRET.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    """One 2-worker run through `leoclr pretrain` (the CLI's Ray path), shared by the checks below."""
    tmp = tmp_path_factory.mktemp("pretrain")
    spec = tiny_spec("ray-demo", tmp, optim={"epochs": 3})
    result = runner.invoke(app, ["pretrain", str(_write(tmp, spec))])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return spec, summary, Path(spec["output_dir"])


def test_two_workers_train_all_epochs_and_write_the_run_folder(finished_run):
    spec, summary, out = finished_run
    assert summary["epoch"] == 3 and 0 <= summary["knn_top1"] <= 100
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["type"] == "epoch"] == [1, 2, 3]
    # 512 images, batch 64 split over 2 workers: 8 steps an epoch, logged every 2 steps
    assert [r["step"] for r in epochs if r["type"] == "step"][:4] == [2, 4, 6, 8]
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved["worker_nodes"]) == 2 and saved["restarts"] == 0
    assert (out / "encoder.pt").is_file()


def test_ray_train_keeps_the_newest_checkpoints(finished_run):
    _, summary, _ = finished_run
    kept = sorted(p.name for p in Path(summary["storage"]).iterdir() if p.name.startswith("epoch-"))
    assert kept == ["epoch-0002", "epoch-0003"]  # checkpoint.keep = 2


def test_mlflow_run_has_params_step_and_epoch_metrics_and_checkpoints(finished_run):
    spec, summary, _ = finished_run
    c = _mlflow()
    run = c.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.temperature"] == "0.2" and run.data.params["scaling.num_workers"] == "2"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "epoch/loss")] == [1, 2, 3]
    assert len(c.get_metric_history(run.info.run_id, "train/loss")) == 12  # 24 steps / log_every 2
    assert [m.step for m in c.get_metric_history(run.info.run_id, "knn_top1")] == [3]
    assert c.get_metric_history(run.info.run_id, "skipped_files")[-1].value == 0
    names = [a.path for a in c.list_artifacts(run.info.run_id, "checkpoints/latest")]
    assert names == ["checkpoints/latest/checkpoint.pt"] and run.data.tags["leoclr.checkpoint_epoch"] == "3"


def test_registered_encoder_loads_in_a_fresh_process_and_embeds(finished_run):
    spec, summary, _ = finished_run
    name = spec["register"]["model_name"]
    assert summary["registry_uri"] == f"models:/{name}@candidate"
    version = _mlflow().get_model_version_by_alias(name, "candidate")
    assert version.tags["leoclr.run_id"] == summary["mlflow_run_id"]
    code = (
        "import mlflow, torch\n"
        f"m = mlflow.pytorch.load_model('models:/{name}@candidate')\n"
        "e = m(torch.rand(5, 3, 16, 16))\n"
        "print(type(m).__name__, tuple(e.shape), bool(torch.isfinite(e).all()))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": core_settings().tracking_uri}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ImageEncoder (5, 64) True"


def test_a_finished_job_run_again_returns_its_result_and_registers_nothing_new(finished_run):
    """The documented resume (same name, same storage) on a job that had finished: the same MLflow
    run, k-NN and model version come back; no run, no version is added and nothing trains."""
    spec, first, out = finished_run
    name = spec["register"]["model_name"]
    c = _mlflow()
    experiment = c.get_experiment_by_name("ray-demo").experiment_id
    assert len(c.search_runs([experiment])) == 1

    result = runner.invoke(app, ["pretrain", str(out.parent.parent / "ray-demo.yaml")])

    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("mlflow_run_id", "knn_top1", "epoch", "model_version", "registry_uri", "storage"):
        assert again[key] == first[key], key
    assert [r.info.run_id for r in c.search_runs([experiment])] == [first["mlflow_run_id"]]
    assert [str(v.version) for v in c.search_model_versions(f"name = '{name}'")] == [first["model_version"]]
    assert len(c.get_metric_history(first["mlflow_run_id"], "train/loss")) == 12  # nothing logged twice
    assert again["already_finished"] and "already finished" in " ".join(result.output.split())


def test_a_finished_job_run_again_on_another_tracking_store_registers_its_result_there(finished_run, tmp_path,
                                                                                        monkeypatch):
    """Its run is not in the store now named: the result is made again there from the final
    checkpoint (same k-NN, one version), without training; run once more, it returns that."""
    spec, first, out = finished_run
    name = spec["register"]["model_name"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # mlflow.set_registry_uri exports it: put back after
    path = str(out.parent.parent / "ray-demo.yaml")

    result = runner.invoke(app, ["pretrain", path])

    assert result.exit_code == 0, result.output
    moved = json.loads(result.stdout.strip().splitlines()[-1])
    assert moved["mlflow_run_id"] != first["mlflow_run_id"]
    assert moved["knn_top1"] == first["knn_top1"] and moved["epoch"] == 3 and moved["model_version"] == "1"
    c = _mlflow()
    assert c.get_run(moved["mlflow_run_id"]).info.status == "FINISHED"
    assert c.get_metric_history(moved["mlflow_run_id"], "train/loss") == []  # nothing trained here
    assert "without training again" in " ".join(result.output.split()) and not moved["already_finished"]

    result = runner.invoke(app, ["pretrain", path])
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again["already_finished"] and again["mlflow_run_id"] == moved["mlflow_run_id"]
    assert [str(v.version) for v in c.search_model_versions(f"name = '{name}'")] == ["1"]


@pytest.mark.parametrize("protocol, evaluation, metrics", [
    ("both", {"knn_k": 20, "probe_epochs": 5}, ("knn_top1", "linear_top1")),
    ("finetune", {"finetune": {"label_fraction": 0.1, "epochs": 2, "batch_size": 16}},
     ("finetune_top1", "finetune_top5")),
])
def test_evaluate_job_on_ray_from_the_registry_tags_the_model_version(finished_run, tmp_path, protocol, evaluation,
                                                                      metrics):
    spec, summary, _ = finished_run
    name, job = spec["register"]["model_name"], f"eval-ray-{protocol}"
    evaluate = {
        "kind": "evaluate", "name": job, "encoder": {"model_uri": f"models:/{name}@candidate"},
        "data": {**spec["data"], "seed": 1}, "protocol": protocol,
        "eval": evaluation, "output_dir": str(tmp_path / "eval"),
    }
    result = runner.invoke(app, ["evaluate", str(_write(tmp_path, evaluate))])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(0 <= res[m] <= 100 for m in metrics)
    c = _mlflow()
    logged = c.get_run(res["mlflow_run_id"]).data
    version = c.get_model_version_by_alias(name, "candidate")
    for m in metrics:
        assert logged.metrics[m] == pytest.approx(res[m])
        assert float(version.tags[f"eval.{job}.{m}"]) == pytest.approx(res[m])
    if protocol == "finetune":
        assert logged.params["eval.finetune.label_fraction"] == "0.1"
        assert res["finetune"] == {"label_fraction": 0.1, "labelled_images": 50}  # 512 images of 10 classes


def test_evaluate_names_an_unknown_registered_model(ray_cluster, tmp_path):
    evaluate = {"kind": "evaluate", "name": "eval-missing", "encoder": {"model_uri": "models:/no-such-model@x"},
                "data": {"num_images": 64, "num_test_images": 32}}
    result = runner.invoke(app, ["evaluate", str(_write(tmp_path, evaluate))])
    assert result.exit_code == 1
    assert "no-such-model" in result.output


def _registered(s3, bucket: str, run_prefix: str, name: str) -> bool:
    """Whether Ray Train's controller has registered checkpoint `name` (not just its upload) in the
    run's storage on S3."""
    client = s3.client()
    try:
        body = client.get_object(Bucket=bucket, Key=f"{run_prefix}/checkpoint_manager_snapshot.json")["Body"]
        snapshot = json.loads(body.read())
    except (ValueError, client.exceptions.NoSuchKey):
        return False
    return any(c.get("checkpoint_dir_name") == name for c in snapshot.get("checkpoint_results", []))


def _train_worker_pids() -> list[int]:
    """Ray Train workers of the module's cluster: descendants of this process (its raylet's workers),
    not those of a cluster another test process runs beside it."""
    parent, workers = {}, []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                parent[int(proc.name)] = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if cmd.startswith(b"ray::RayTrainWorker"):
                workers.append(int(proc.name))

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid in workers if ours(pid)]


def test_a_killed_worker_does_not_lose_the_run(ray_cluster, s3, bucket, tmp_path):
    """SIGKILL one training worker after its second checkpoint, with the checkpoints on S3: the
    worker group restarts from the newest checkpoint there and the run ends with every epoch, each
    recorded once; S3 holds the newest checkpoints, and the secret key shows nowhere."""
    spec = tiny_spec("ray-kill", tmp_path, optim={"epochs": 6},
                     checkpoint={"every": 1, "keep": 2, "max_failures": 2, "storage_path": f"s3://{bucket}/kill"})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "LEOCLR_PROGRESS": "0"}  # with the S3 variables
    proc = subprocess.Popen([sys.executable, "-m", "leoclr_core.cli", "pretrain", str(_write(tmp_path, spec))],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not _registered(s3, bucket, "kill/ray-kill", "epoch-0002"):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no second checkpoint within 300 s"
        time.sleep(0.5)
    victims = _train_worker_pids()
    assert victims, "no RayTrainWorker process found"
    os.kill(victims[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(output.strip().splitlines()[-1])
    print(f"\nkilled-worker run: {summary['restarts']} restart(s), resumed after epoch(s) {summary['resumed_from']}, "
          f"{summary['epochs_redone']} finished epoch(s) redone, {summary['seconds']} s for 6 epochs")
    assert summary["epoch"] == 6 and summary["restarts"] >= 1
    # resumed from a checkpoint, not from scratch: epoch 2's existed before the kill. (Ray Train
    # registers reported checkpoints asynchronously, so the newest one or two may not count yet.)
    assert summary["resumed_from"][0] >= 2
    out = Path(spec["output_dir"])
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["type"] == "epoch"]
    assert epochs == [1, 2, 3, 4, 5, 6]
    history = _mlflow().get_metric_history(summary["mlflow_run_id"], "epoch/loss")
    assert {m.step for m in history} == {1, 2, 3, 4, 5, 6}
    assert summary["storage"] == f"s3://{bucket}/kill/ray-kill"
    assert _kept_checkpoints(s3, bucket, "kill/ray-kill") == ["epoch-0005", "epoch-0006"]  # checkpoint.keep = 2
    saved = json.loads((out / "summary.json").read_text())
    assert saved["checkpoint"] == f"s3://{bucket}/kill/ray-kill/epoch-0006"
    _assert_no_secret(s3, bucket, "kill", summary["mlflow_run_id"], out, output)


def test_a_diverged_run_fails_at_once_naming_the_step(ray_cluster, tmp_path, caplog):
    """A loss that turns NaN is not a worker failure: restarted from its last checkpoint, the run
    would replay the same steps into the same NaN, max_failures times. It fails at once, says why
    and at which step, closes its MLflow run as failed and registers nothing."""
    # lr x weight decay = 100: every step multiplies the weights by about -99, so they overflow.
    spec = tiny_spec("ray-diverge", tmp_path, optim={"epochs": 3, "lr": 100, "weight_decay": 1.0, "schedule": "constant"},
                     checkpoint={"every": 1, "keep": 2, "max_failures": 2})
    with caplog.at_level(logging.WARNING, logger="leoclr_core.distributed.pretrain"):
        result = runner.invoke(app, ["pretrain", str(_write(tmp_path, spec))])

    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert re.search(r"FloatingPointError: the training loss is -?(nan|inf) at step \d+", said), said[-2000:]
    assert not [r.getMessage() for r in caplog.records if "restarted" in r.getMessage()]
    mlflow = _mlflow()
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("ray-diverge").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert mlflow.search_model_versions("name='ray-diverge-encoder'") == []


def test_image_folder_streams_through_ray_data_and_counts_corrupt_files(ray_cluster, s3, bucket, tmp_path):
    """An image folder on S3: Ray Data reads the training split's files from there, and k-NN reads
    the labelled hold-out and its memory bank from there too."""
    import numpy as np
    from PIL import Image

    from leoclr_core.distributed.pretrain import run_pretrain
    from leoclr_core.spec.models import parse_spec

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (20 + i % 7, 24, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    (root / "class0" / "garbage.jpg").write_bytes(b"not an image at all")
    good = (root / "class1" / "0.png").read_bytes()
    (root / "class1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class2" / "empty.png").write_bytes(b"")
    uri = upload(s3, bucket, root, "images")
    spec = parse_spec(tiny_spec(
        "ray-folder", tmp_path,
        data={"source": "imagefolder", "path": uri, "num_images": None, "num_test_images": 20, "image_size": 16},
        loss={"queue_size": 32}, optim={"epochs": 1, "batch_size": 32}, scaling={"num_workers": 1},
        eval={"knn_every": 0, "knn_k": 10}, register={"model_name": None}))
    run = run_pretrain(spec)
    # the 3 bad files may fall in either split: the training stream counts those of the train split
    n_train_bad = 3 - sum(1 for p in ("garbage.jpg", "truncated.png", "empty.png")
                          if any(str(f).endswith(p) for f in _test_split_files(spec)))
    assert n_train_bad >= 1  # the seed's hold-out leaves some bad files in the train split
    assert run.state.final["skipped_files"] == n_train_bad
    history = _mlflow().get_metric_history(run.run_id, "skipped_files")
    assert history[-1].value == n_train_bad
    assert run.encoder is not None and run.encoder.version is None  # logged, not registered
    # 103 training files less the bad ones, batch 32: 3 steps; k-NN on the 20 held-out files
    assert run.state.final["step"] == 3 and 0 <= run.state.final["knn_top1"] <= 100
    assert [m.step for m in _mlflow().get_metric_history(run.run_id, "knn_top1")] == [1]


def test_workers_decode_an_image_folders_jpegs_when_asked(ray_cluster, tmp_path):
    """`data.decode: gpu` on a CPU cluster: the workers get the JPEGs as file bytes and decode them
    on their device (the CPU here, nvJPEG on a GPU); a file only the worker's decoder finds broken
    is replaced in its batch and counted with those Ray Data dropped."""
    import io

    import numpy as np
    from PIL import Image

    from leoclr_core.distributed.pretrain import run_pretrain
    from leoclr_core.spec.models import parse_spec

    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(62):
        Image.fromarray(rng.integers(0, 255, (20 + i % 5, 24, 3), dtype=np.uint8)).save(root / f"{i:02d}.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "png.png")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    whole = jpeg.getvalue()
    (root / "cut_scan.jpg").write_bytes(whole[: whole.find(b"\xff\xda")] + b"\xff\xd9")  # decoder fails
    (root / "garbage.jpg").write_bytes(b"not an image at all")  # Ray Data's task drops it
    spec = parse_spec(tiny_spec(
        "ray-folder-jpeg", tmp_path,
        data={"source": "imagefolder", "path": str(root), "num_images": None, "num_test_images": 0,
              "image_size": 16, "decode": "gpu", "labelled": False},
        augment={"batched": False}, loss={"queue_size": 32}, optim={"epochs": 1, "batch_size": 32},
        scaling={"num_workers": 1}, register={"model_name": None}))
    run = run_pretrain(spec)
    final = run.state.final
    # 65 files, 64 streamed: 2 full batches of 32, the cut scan in one of them. Had Ray Data decoded
    # it would have dropped the cut scan too, leaving 63 rows: one batch.
    assert final["step"] == 2 and final["skipped_files"] == 2
    assert np.isfinite(final["loss"])


def _test_split_files(spec):
    from leoclr_core.data import ImageFolder

    d = spec.data
    return ImageFolder(d.path, "test", num_test=d.num_test_images, seed=d.seed).files


@pytest.mark.parametrize("decode, steps, on_s3", [("auto", 1, False), ("gpu", 2, True)], ids=["auto", "gpu-s3"])
def test_parquet_rows_stream_through_ray_datas_reader(ray_cluster, s3, bucket, tmp_path, decode, steps, on_s3):
    """Ray Data's Parquet reader feeds training, corrupt rows are skipped and counted. A local,
    unlabelled, not pre-split file: k-NN is skipped for want of a test split. On S3, pre-split
    into labelled train/ and test/: only train/ streams (the same steps), and k-NN reads both
    splits from there. With `decode: gpu` the JPEG rows reach the worker as bytes and its decoder
    finds the broken scan."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from leoclr_core.distributed.pretrain import run_pretrain
    from leoclr_core.spec.models import parse_spec

    rng = np.random.default_rng(3)
    rows = []
    for _ in range(65):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
        rows.append(buf.getvalue())
    rows[5] = rows[5][:40]  # a truncated JPEG: Ray Data's task drops it either way
    rows[9] = rows[9][: rows[9].find(b"\xff\xda")] + b"\xff\xd9"  # headers whole, scan gone
    if on_s3:
        root = tmp_path / "pq"
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
        pq.write_table(pa.table({"jpeg": rows, "label": [i % 3 for i in range(65)]}), root / "train" / "0.parquet")
        pq.write_table(pa.table({"jpeg": rows[10:30], "label": [i % 3 for i in range(20)]}),
                       root / "test" / "0.parquet")
        path, labels = upload(s3, bucket, root, "pq"), "label"
    else:
        pq.write_table(pa.table({"jpeg": rows}), tmp_path / "images.parquet")
        path, labels = str(tmp_path / "images.parquet"), None
    spec = parse_spec(tiny_spec(
        f"ray-parquet-{decode}", tmp_path,
        data={"source": "parquet", "path": path, "image_column": "jpeg",
              "label_column": labels, "num_images": None, "image_size": 16, "decode": decode},
        loss={"queue_size": 32}, optim={"epochs": 1, "batch_size": 32}, scaling={"num_workers": 1},
        register={"model_name": None}))
    run = run_pretrain(spec)
    final = run.state.final
    # auto (no GPU): the task drops both broken rows, leaving 63 rows, one batch of 32. gpu: 64
    # rows stream, two batches, and the worker's decoder meets the broken scan in one of them.
    assert final["skipped_files"] == 2 and final["step"] == steps
    if on_s3:
        assert 0 <= final["knn_top1"] <= 100
    else:
        assert "knn_top1" not in final


def test_a_job_whose_driver_died_resumes_into_the_same_mlflow_run(ray_cluster, s3, bucket, tmp_path):
    """SIGKILL the driver (`leoclr pretrain`) after epoch 2's checkpoint, its storage on S3; running
    the same spec again resumes from that checkpoint (same name, same storage) and continues the
    same MLflow run."""
    spec = tiny_spec("ray-driver-dies", tmp_path, optim={"epochs": 4},
                     checkpoint={"storage_path": f"s3://{bucket}/driver"})
    path = _write(tmp_path, spec)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "LEOCLR_PROGRESS": "0"}  # with the S3 variables
    first_log = tmp_path / "first-driver.log"
    with open(first_log, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "leoclr_core.cli", "pretrain", str(path)],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not _registered(s3, bucket, "driver/ray-driver-dies", "epoch-0002"):
        assert proc.poll() is None and time.monotonic() < deadline, "the first driver ended or stalled"
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    c = _mlflow()
    [first] = c.search_runs([c.get_experiment_by_name("ray-driver-dies").experiment_id])
    assert first.info.status == "RUNNING"  # nobody closed it
    result = runner.invoke(app, ["pretrain", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["mlflow_run_id"] == first.info.run_id and summary["epoch"] == 4
    run = c.get_run(first.info.run_id)
    assert run.info.status == "FINISHED"
    assert {m.step for m in c.get_metric_history(run.info.run_id, "epoch/loss")} == {1, 2, 3, 4}
    records = [json.loads(x) for x in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3, 4]  # both drivers' records
    # resumed from S3, not from scratch: epochs 1 and 2 were trained (and logged) once
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "epoch/loss")]
    assert steps.count(1) == 1 and steps.count(2) == 1, steps
    assert summary["storage"] == f"s3://{bucket}/driver/ray-driver-dies"
    assert _kept_checkpoints(s3, bucket, "driver/ray-driver-dies") == ["epoch-0003", "epoch-0004"]
    _assert_no_secret(s3, bucket, "driver", first.info.run_id, Path(spec["output_dir"]), first_log.read_text(),
                      result.output)

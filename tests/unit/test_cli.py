import json

from typer.testing import CliRunner

from leoclr_core.cli import app

runner = CliRunner()
TINY = [
    "--set", "data.num_images=128", "--set", "data.num_test_images=64", "--set", "model.width=4",
    "--set", "model.proj_hidden_dim=16", "--set", "model.proj_dim=8", "--set", "loss.queue_size=64",
    "--set", "optim.batch_size=32", "--set", "optim.epochs=1", "--set", "eval.knn_k=10",
    "--set", "data.synthetic.source_size=32", "--set", "data.synthetic.object_size=[12, 20]",
    "--set", "data.image_size=16",
]


def test_pretrain_local_runs_the_demo_config_and_reports_knn(tmp_path):
    result = runner.invoke(app, ["pretrain", "configs/demo.yaml", "--local", "-o", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.output
    assert "final k-NN top-1" in result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["epoch"] == 1 and 0 <= summary["knn_top1"] <= 100
    assert (tmp_path / "encoder.pt").is_file()


def test_a_diverged_local_run_fails_with_the_step_named_not_a_traceback(tmp_path):
    # lr x weight decay = 100: every step multiplies the weights by about -99, so they overflow.
    diverging = ["--set", "optim.lr=100", "--set", "optim.weight_decay=1.0", "--set", "optim.schedule=constant",
                 "--set", "optim.epochs=3", "--set", "scaling.log_every=1"]
    result = runner.invoke(app, ["pretrain", "configs/demo.yaml", "--local", "-o", str(tmp_path), *TINY, *diverging])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "error: the training loss is" in said and "at step" in said, said[-2000:]
    assert "Traceback" not in said


def test_pretrain_rejects_an_invalid_spec_naming_the_field(tmp_path):
    result = runner.invoke(app, ["pretrain", "configs/demo.yaml", "--set", "optim.lr=-1"])
    assert result.exit_code == 2
    assert "optim.lr: Input should be greater than 0" in result.output


def test_pretrain_refuses_an_evaluate_spec():
    result = runner.invoke(app, ["pretrain", "configs/evaluate-demo.yaml"])
    assert result.exit_code == 2 and "is a 'evaluate' spec" in result.output


def test_evaluate_reports_a_missing_encoder_cleanly(tmp_path):
    result = runner.invoke(app, ["evaluate", "configs/evaluate-demo.yaml", "--local",
                                 "--set", f"encoder={{checkpoint: {tmp_path}/x}}"])
    assert result.exit_code == 1 and "does not exist" in " ".join(result.output.split())  # wrapped at any width


def test_experiment_quick_writes_table_and_plot(tmp_path):
    result = runner.invoke(app, ["experiment", "crop-semantics", "--quick", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "results.md").read_text()
    for variant in ("one-object", "distractor", "small-objects"):
        assert variant in table
    assert "QUICK" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    row = results["variants"]["distractor"]
    assert set(row["methods"]) == {"LeOCLR", "MoCo-v2"} and 0 <= row["random_init"] <= 100


def test_experiment_rejects_an_unknown_variant(tmp_path):
    result = runner.invoke(app, ["experiment", "crop-semantics", "--quick", "--variant", "nope", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "unknown variant" in result.output


def test_run_job_needs_its_spec_in_the_environment(monkeypatch):
    monkeypatch.delenv("LEOCLR_JOB_SPEC", raising=False)
    result = runner.invoke(app, ["run-job"])
    assert result.exit_code == 2 and "LEOCLR_JOB_SPEC is not set" in result.output
    monkeypatch.setenv("LEOCLR_JOB_SPEC", '{"kind": "pretrain", "optim": {"lr": -1}}')
    result = runner.invoke(app, ["run-job"])
    assert result.exit_code == 2 and "optim.lr" in result.output


class _Job:
    """A fake API client following one job: on its second poll a Ctrl-C arrives where Python drops
    the KeyboardInterrupt (as it does inside a finaliser)."""

    url = "http://127.0.0.1:1"

    def __init__(self):
        self.polls, self.cancelled = 0, []

    def wait(self, job_id, on_update):
        import signal

        while self.polls < 20:
            self.polls += 1
            if self.polls == 2:
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    pass  # lost here
            on_update({"id": job_id, "status": "running", "progress": {}})
        return {"id": job_id, "status": "succeeded"}

    def cancel(self, job_id):
        self.cancelled.append(job_id)


def test_a_ctrl_c_that_python_drops_still_cancels_the_followed_job():
    import signal

    import pytest
    import typer

    from leoclr_core.cli.app import _follow

    client, before = _Job(), signal.getsignal(signal.SIGINT)
    with pytest.raises(typer.Exit) as stopped:
        _follow(client, {"id": "job-1"})
    assert stopped.value.exit_code == 130
    assert client.cancelled == ["job-1"] and client.polls == 2  # stopped at the next poll
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back

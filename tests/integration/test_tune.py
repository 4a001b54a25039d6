"""A search end to end on real Ray Tune and MLflow: trials as Ray Train runs, ASHA stopping the weak
ones, a parent run with a child per trial, the best trial's encoder registered."""

from __future__ import annotations

import csv

import pytest

from leoclr_core.settings import CoreSettings
from leoclr_core.spec.models import SpecError, TuneSpec, parse_spec

from .conftest import tiny_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def tune_spec(tmp_path, **fields) -> dict:
    base = tiny_spec("search-base", tmp_path, scaling={"num_workers": 1, "log_every": 4},
                     optim={"epochs": 3, "batch_size": 64}, register={"model_name": None})
    base.pop("output_dir")
    return {
        "kind": "tune", "name": "search", "output_dir": str(tmp_path / "runs" / "search"), "base": base,
        # Ranked by loss, which the temperature moves far more than any noise: the two trials at
        # 1.0 (InfoNCE near log(queue + 1)) start second and reach ASHA's first rung with a loss
        # well above the two at 0.05, and ASHA stops them there (later rungs may stop more). (k-NN accuracy on a test set this
        # small is too noisy to say which trial ASHA must stop; the demo search ranks by it.)
        "space": {"loss.temperature": {"type": "grid", "values": [0.05, 0.05, 1.0, 1.0]},
                  "optim.lr": {"type": "loguniform", "low": 0.03, "high": 0.1}},
        "num_samples": 1, "metric": "loss",
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 2,
        "register": {"model_name": "search-best", "alias": "candidate"},
        **fields,
    }


@pytest.fixture(scope="module")
def ray_cluster():
    """Two trials of 3 logical CPUs each (worker, view task, Ray Data's reads), one to spare, and 8
    more: here the worker group of every trial Tune ends stays placed (4 trials a search, two
    searches). Tune ends a trial's actor, and with it its Ray Train controller, before the controller
    removes its group; Ray Train's placement-group cleaner, a detached actor, would then, but it asks
    the state API at the machine's outward address, where a Ray bound to 127.0.0.1 does not answer."""
    import ray

    ctx = ray.init(address="local", num_cpus=15, _node_ip_address="127.0.0.1", include_dashboard=False,
                   log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def finished_search(ray_cluster, tmp_path_factory):
    """One search run to its end (shared: the checks below and the re-runs of it)."""
    from leoclr_core.distributed.tune import run_tune

    tmp = tmp_path_factory.mktemp("search")
    settings = CoreSettings(data_dir=tmp / "data")
    spec = parse_spec(tune_spec(tmp))
    return spec, settings, run_tune(spec, settings=settings), tmp


def test_a_search_ranks_trials_stops_weak_ones_and_registers_the_best(finished_search):
    from leoclr_core import tracking

    spec, settings, run, tmp_path = finished_search
    c = tracking.client(settings)
    parent = c.get_run(run.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["max_concurrent_trials"] == "2"
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{run.run_id}'")
    assert sorted(r.data.tags["leoclr.trial"] for r in children) == [f"trial-{i:03d}" for i in range(4)]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children), \
        [(r.data.tags["leoclr.trial"], r.info.status) for r in children]
    assert sorted(r.data.params["loss.temperature"] for r in children) == ["0.05", "0.05", "1.0", "1.0"]

    stopped = [r for r in run.table if r["stopped_early"]]
    assert stopped and all(r["epochs"] < 3 for r in stopped), run.table
    # A trial at 1.0 is stopped at a rung, before its last epoch. Which rung (1 or 2) depends on
    # the records ASHA holds when the trial reaches it, so it is not asserted. (This test failed
    # once in a full run and never alone; the messages carry the table for the next time.)
    assert any(r["trial"] in ("trial-002", "trial-003") for r in stopped), run.table
    by_trial = {r.data.tags["leoclr.trial"]: r for r in children}
    assert all(by_trial[r["trial"]].data.tags.get("leoclr.stopped_early") == "true" for r in stopped)

    finished = [r for r in run.table if not r["stopped_early"]]
    best = min(finished, key=lambda r: r["loss"])
    assert run.best["trial"] == best["trial"] and run.table[0]["loss"] <= best["loss"], run.table
    mv = c.get_model_version_by_alias("search-best", "candidate")
    assert mv.run_id == best["mlflow_run_id"] == by_trial[best["trial"]].info.run_id

    artifacts = {a.path for a in c.list_artifacts(run.run_id)}
    assert {"trials.csv", "trials.png"} <= artifacts
    rows = list(csv.DictReader(open(tmp_path / "runs" / "search" / "trials.csv")))
    assert [r["trial"] for r in rows] == [r["trial"] for r in run.table] and rows[0]["rank"] == "1"


def _search_runs(settings, name="search"):
    from leoclr_core import tracking

    c = tracking.client(settings)
    exp = c.get_experiment_by_name(name)
    return c, ([] if exp is None else c.search_runs([exp.experiment_id]))


def test_a_finished_search_run_again_returns_its_result_and_registers_nothing_new(finished_search):
    """The documented resume, on a search that had finished: the same parent and child runs,
    table and registered version come back, and nothing is created in MLflow."""
    from leoclr_core.distributed.tune import run_tune

    spec, settings, first, _ = finished_search
    c, runs_before = _search_runs(settings)

    again = run_tune(spec, settings=settings)

    assert again.run_id == first.run_id
    assert again.table == first.table and all(r["mlflow_run_id"] for r in again.table), again.table
    assert again.best["mlflow_run_id"] == first.best["mlflow_run_id"]
    assert (again.encoder.version, again.encoder.registry_uri) == (first.encoder.version, first.encoder.registry_uri)
    assert [str(v.version) for v in c.search_model_versions("name = 'search-best'")] == [first.encoder.version]
    _, runs_after = _search_runs(settings)
    assert sorted(r.info.run_id for r in runs_after) == sorted(r.info.run_id for r in runs_before)
    assert c.get_run(first.run_id).info.status == "FINISHED" and again.already_finished


def test_a_finished_search_run_again_on_another_tracking_store_says_it_starts_afresh(finished_search):
    """Its runs are not in the store now named: the search runs afresh into it, under a Tune
    experiment of its own, and says so; run once more, it returns that result."""
    from leoclr_core import tracking
    from leoclr_core.distributed.tune import run_tune

    _, settings, first, tmp = finished_search
    # The same search (name and storage: what finds a search's Tune experiment), shrunk to two
    # one-epoch trials: what is checked is where it runs and what it says, not how it ranks.
    shrunk = tune_spec(tmp, space={"loss.temperature": {"type": "grid", "values": [0.05, 1.0]}},
                       scheduler={"type": "none"})
    shrunk["base"]["optim"]["epochs"] = 1
    spec = parse_spec(shrunk)
    other = CoreSettings(data_dir=settings.data_dir, mlflow_tracking_uri=f"sqlite:///{tmp / 'other-mlflow.db'}")

    afresh = run_tune(spec, settings=other)

    c = tracking.client(other)
    children = c.search_runs([c.get_run(afresh.run_id).info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{afresh.run_id}'")
    assert sorted(r.data.tags["leoclr.trial"] for r in children) == ["trial-000", "trial-001"]
    assert all(r["mlflow_run_id"] for r in afresh.table) and afresh.encoder.version == "1"
    # Trained again, not replayed from the first search's checkpoints: every trial logged epoch 1.
    assert all(c.get_metric_history(r.info.run_id, "epoch/loss")[0].step == 1 for r in children)
    assert afresh.storage != first.storage and afresh.storage.startswith(first.storage + "-")
    assert not afresh.already_finished and "starts afresh" in afresh.note

    again = run_tune(spec, settings=other)
    assert again.already_finished and again.run_id == afresh.run_id and again.storage == afresh.storage
    assert [str(v.version) for v in c.search_model_versions("name = 'search-best'")] == ["1"]


def test_a_search_the_cluster_cannot_place_is_refused(ray_cluster, tmp_path):
    from leoclr_core.distributed.tune import cluster_check, per_trial_cpus

    spec = parse_spec(tune_spec(tmp_path, max_concurrent_trials=8))
    with pytest.raises(ValueError, match=r"max_concurrent_trials \(8\) x 3.01 CPUs per trial = 24.08 CPUs, but the cluster has 15"):
        cluster_check(spec, per_trial_cpus(spec))


@pytest.mark.parametrize("space, message", [
    ({"loss.temprature": {"type": "choice", "values": [0.1]}}, "space.loss.temprature: loss.temprature is not a field"),
    ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}, "loguniform needs low > 0"),
    ({"optim.epochs": {"type": "choice", "values": [0]}}, "space.optim.epochs"),
    ({"register.alias": {"type": "choice", "values": ["x"]}}, "cannot be searched"),
])
def test_impossible_searches_are_refused_naming_the_field(tmp_path, space, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(tune_spec(tmp_path, space=space))


def test_optuna_cannot_take_a_grid(tmp_path):
    with pytest.raises(SpecError, match="optuna"):
        parse_spec(tune_spec(tmp_path, search="optuna"))
    spec = parse_spec(tune_spec(tmp_path, search="optuna", space={"optim.lr": {"type": "choice", "values": [0.1]}}))
    assert isinstance(spec, TuneSpec) and spec.direction == "min"


def test_the_optuna_search_draws_from_the_spec_space(ray_cluster, tmp_path):
    """The optuna path, with a stand-in trainable: Optuna takes the space as the spec writes it."""
    from ray import tune

    from leoclr_core.distributed.tune import _tune_config, domain

    spec = parse_spec(tune_spec(tmp_path, search="optuna", num_samples=3, scheduler={"type": "none"}, space={
        "optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1},
        "loss.queue_size": {"type": "choice", "values": [64, 128]}}))

    def trainable(config):
        return {"loss": config["optim.lr"], "epoch": 1}

    tuner = tune.Tuner(trainable, param_space={p: domain(d) for p, d in spec.space.items()},
                       tune_config=_tune_config(spec),
                       run_config=tune.RunConfig(name="optuna", storage_path=str(tmp_path / "tune"), verbose=0))
    grid = tuner.fit()
    assert len(grid) == 3 and not grid.errors
    for result in grid:
        assert 0.01 <= result.config["optim.lr"] <= 0.1 and result.config["loss.queue_size"] in (64, 128)
    assert grid.get_best_result().metrics["loss"] == min(r.metrics["loss"] for r in grid)

"""What the API reads from MLflow (service/tracking.py): a job's progress, metric history and result,
a search's trials, and the model registry. MLflow on SQLite in a temp folder, written as a driver would."""

from __future__ import annotations

from .fakes import AUTH, SPEC, TUNE, FakeRunner, driver_run, make_client, mlflow_store  # noqa: F401 - a fixture


def test_reading_a_job_that_just_finished_records_its_result(make_client, tmp_path):
    uri, ml = mlflow_store(tmp_path)
    runner = FakeRunner()
    runner.log_text = '{"registry_uri": "models:/not-from-the-log@candidate"}\n'  # the log is not read for it
    with make_client(runner, mlflow_tracking_uri=uri) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        driver_run(ml, job["id"], SPEC["name"], {"registry_uri": "models:/y@candidate"})
        runner.state = "succeeded"
        done = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
        assert done["status"] == "succeeded" and done["result"]["registry_uri"] == "models:/y@candidate"
        assert c.get("/v1/jobs", headers=AUTH).json()["items"][0]["result"] == done["result"]  # stored


def test_a_finished_job_whose_driver_logged_no_result_has_none(make_client, tmp_path):
    uri, ml = mlflow_store(tmp_path)
    runner = FakeRunner()
    with make_client(runner, mlflow_tracking_uri=uri) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        driver_run(ml, job["id"], SPEC["name"])  # a driver that failed before its end
        runner.state = "failed"
        done = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
        assert done["status"] == "failed" and done["result"] is None and done["tracking_error"] is None


def test_a_result_mlflow_could_not_give_when_the_job_ended_is_read_when_the_job_is(make_client, tmp_path):
    uri, ml = mlflow_store(tmp_path)
    with make_client(FakeRunner(), mlflow_tracking_uri=uri) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        c.app.state.store.finish(job["id"], "succeeded")  # as reconcile records it with MLflow down
        driver_run(ml, job["id"], SPEC["name"], {"knn_top1": 61.5})
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["result"] == {"knn_top1": 61.5}
        assert c.app.state.store.get(job["id"]).result == {"knn_top1": 61.5}


def test_progress_and_history_come_from_the_jobs_mlflow_run(make_client, tmp_path):
    from leoclr_core import contract

    uri, ml = mlflow_store(tmp_path)
    runner = FakeRunner()
    with make_client(runner, mlflow_tracking_uri=uri) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["progress"] is None  # no run yet
        assert c.get(f"/v1/jobs/{job['id']}/metrics", headers=AUTH).status_code == 404
        exp = ml.create_experiment(SPEC["name"])
        other = ml.create_run(exp, tags={contract.TAG_SERVICE_JOB: "someone-else"}).info.run_id
        ml.log_metric(other, contract.M_STEP, 99)
        run = ml.create_run(exp, tags={contract.TAG_SERVICE_JOB: job["id"]}).info.run_id
        for step in (10, 20):
            ml.log_metric(run, contract.M_STEP, step, step=step)
            ml.log_metric(run, contract.M_LOSS, 5.0 - step / 10, step=step)
        for k, v in {contract.M_TOTAL: 80, contract.M_EPOCH: 3, contract.M_EPOCHS: 8, contract.M_IPS: 1500.0,
                     contract.M_ETA: 42.0, contract.M_KNN: 31.5}.items():
            ml.log_metric(run, k, v, step=20)
        p = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["progress"]
        assert (p["step"], p["total_steps"], p["fraction"], p["epoch"], p["epochs"]) == (20, 80, 0.25, 3, 8)
        assert (p["loss"], p["instances_per_s"], p["eta_seconds"], p["knn_top1"]) == (3.0, 1500.0, 42.0, 31.5)
        assert p["mlflow_run_id"] == run and p["mlflow_run_url"] == f"runs:/{run}"
        h = c.get(f"/v1/jobs/{job['id']}/metrics", params={"key": contract.M_LOSS}, headers=AUTH).json()
        assert [(x["step"], x["value"]) for x in h["metrics"][contract.M_LOSS]] == [(10, 4.0), (20, 3.0)]
        r = c.get(f"/v1/jobs/{job['id']}/metrics", params={"key": "nope"}, headers=AUTH)
        assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_models_list_versions_with_their_metrics_and_an_alias_moves(make_client, tmp_path):
    from leoclr_core import contract

    uri, ml = mlflow_store(tmp_path)
    ml.create_registered_model("enc")
    for i in (1, 2):
        v = ml.create_model_version("enc", source=f"{tmp_path}/m{i}", run_id=None)
        ml.set_model_version_tag("enc", v.version, "metric.knn_top1", str(50.0 + i))
        ml.set_model_version_tag("enc", v.version, contract.TAG_SERVICE_JOB, f"job{i}")
    ml.set_registered_model_alias("enc", "candidate", "2")
    with make_client(mlflow_tracking_uri=uri) as c:
        [model] = c.get("/v1/models", headers=AUTH).json()["items"]
        assert model["name"] == "enc" and model["aliases"] == {"candidate": "2"}
        latest = model["versions"][0]
        assert (latest["version"], latest["job_id"], latest["metrics"]) == ("2", "job2", {"knn_top1": 52.0})
        assert latest["uri"] == "models:/enc/2" and latest["aliases"] == ["candidate"]
        r = c.post("/v1/models/enc/aliases", json={"alias": "champion", "version": "1"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["aliases"] == {"candidate": "2", "champion": "1"}
        assert str(ml.get_model_version_by_alias("enc", "champion").version) == "1"
        assert c.post("/v1/models/enc/aliases", json={"alias": "champion", "version": "9"},
                      headers=AUTH).status_code == 404
        assert c.post("/v1/models/nope/aliases", json={"alias": "champion", "version": "1"},
                      headers=AUTH).status_code == 404
        assert c.post("/v1/models/enc/aliases", json={"alias": "bad alias!", "version": "1"},
                      headers=AUTH).status_code == 422
        assert c.post("/v1/models/enc/aliases", json={"alias": "latest", "version": "1"},
                      headers=AUTH).status_code == 422
        assert c.get("/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401


def test_a_tune_job_shows_its_trials_and_the_best_so_far(make_client, tmp_path):
    from leoclr_core import contract

    uri, ml = mlflow_store(tmp_path)
    runner = FakeRunner()
    with make_client(runner, mlflow_tracking_uri=uri) as c:
        r = c.post("/v1/jobs", json=TUNE, headers=AUTH)
        assert r.status_code == 201 and r.json()["kind"] == "tune", r.text
        job = r.json()
        exp = ml.create_experiment("search-api")
        parent = ml.create_run(exp, tags={contract.TAG_SERVICE_JOB: job["id"]}).info.run_id
        trials = [("trial-000", "FINISHED", 41.0, None), ("trial-001", "KILLED", 20.0, "true"),
                  ("trial-002", "RUNNING", 44.5, None), ("trial-003", "FAILED", None, None)]
        for name, st, knn, stopped in trials:
            tags = {"mlflow.parentRunId": parent, contract.TAG_TRIAL: name}
            if stopped:
                tags[contract.TAG_STOPPED_EARLY] = stopped
            run = ml.create_run(exp, tags=tags).info.run_id
            ml.log_param(run, "optim.lr", "0.1" if name == "trial-002" else "0.01")
            if knn is not None:
                ml.log_metric(run, "knn_top1", knn)
            if st != "RUNNING":
                ml.set_terminated(run, st)
        t = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["progress"]["trials"]
        assert (t["total"], t["finished"], t["running"], t["stopped_early"], t["failed"]) == (4, 1, 1, 1, 1)
        assert t["best"]["trial"] == "trial-002" and t["best"]["value"] == 44.5
        assert t["best"]["params"] == {"optim.lr": "0.1"}

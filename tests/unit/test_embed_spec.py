"""The embed job's spec: what it accepts, what it refuses (naming the field), what it asks of Ray,
and that the REST API and the CLI take it as a job kind of its own."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from leoclr_core.spec.models import KINDS, EmbedSpec, SpecError, parse_spec
from leoclr_core.spec.resources import job_resources

from .fakes import AUTH, FakeRunner, make_client  # noqa: F401 - make_client is a fixture

EMBED = {"kind": "embed", "name": "embed-demo", "encoder": {"model_uri": "models:/demo@champion"},
         "data": {"num_images": 64}}


def test_a_minimal_embed_spec_takes_its_defaults():
    spec = parse_spec(EMBED)
    assert isinstance(spec, EmbedSpec) and "embed" in KINDS
    assert (spec.batch_size, spec.replicas, spec.output_dir) == (256, 1, None)
    assert spec.output("/data/store/") == "/data/store/embeddings/embed-demo"
    assert parse_spec({**EMBED, "output_dir": "s3://bucket/e"}).output("/data") == "s3://bucket/e"


@pytest.mark.parametrize("change, field", [
    ({"encoder": {}}, "give exactly one of checkpoint or model_uri"),
    ({"encoder": {"checkpoint": "a", "model_uri": "models:/x@y"}}, "give exactly one of checkpoint or model_uri"),
    ({"replicas": 0}, "replicas"),
    ({"batch_size": 0}, "batch_size"),
    ({"optim": {"epochs": 1}}, "optim: unknown field"),
    ({"scaling": {"num_workers": 2}}, "scaling.num_workers is not read by an embed job; the number of model "
                                      "replicas is `replicas`"),
    ({"scaling": {"data_compute": "actors"}}, "scaling.data_compute is not read by an embed job"),
    ({"data": {"source": "imagefolder", "path": "/x", "decode": "gpu"}}, "data.decode 'gpu' is not used"),
    ({"data": {"source": "imagefolder"}}, "path is required for source 'imagefolder'"),
])
def test_an_impossible_embed_spec_is_refused_naming_the_field(change, field):
    with pytest.raises(SpecError) as err:
        parse_spec({**EMBED, **change})
    assert field in str(err.value)


def test_an_embed_job_asks_for_its_replicas_decode_tasks_and_one_cpu_for_reads_and_writes():
    spec = parse_spec({**EMBED, "replicas": 3, "scaling": {"cpus_per_worker": 2, "data_workers": 4,
                                                           "data_cpus_per_worker": 0.5}})
    assert job_resources(spec) == {"CPU": 3 * 2 + 4 * 0.5 + 1, "GPU": 0.0}
    gpu = parse_spec({**EMBED, "replicas": 2, "scaling": {"use_gpu": True, "gpus_per_worker": 0.5}})
    assert job_resources(gpu) == {"CPU": 2 * 1 + 1 + 1, "GPU": 1.0}


def test_the_api_accepts_an_embed_job_and_keeps_its_outputs_inside_the_data_directory(make_client, tmp_path):
    runner = FakeRunner()
    with make_client(runner) as c:
        r = c.post("/v1/jobs", json=EMBED, headers=AUTH)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["kind"] == "embed" and job["spec"]["replicas"] == 1 and runner.submitted[0][0] == job["id"]
        assert c.get("/v1/jobs?kind=embed", headers=AUTH).json()["total"] == 1
        r = c.post("/v1/jobs", json={**EMBED, "output_dir": "/tmp/elsewhere"}, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"].startswith("output_dir"), r.text
        r = c.post("/v1/jobs", json={**EMBED, "replicas": -1}, headers=AUTH)
        assert r.status_code == 422 and "replicas" in r.json()["detail"]
        schema = c.get("/openapi.json").json()
        assert "EmbedSpec" in schema["components"]["schemas"]


def test_leoclr_embed_refuses_a_spec_of_another_kind(tmp_path):
    from leoclr_core.cli.app import app

    path = tmp_path / "pretrain.yaml"
    path.write_text("kind: pretrain\nname: p\n")
    result = CliRunner().invoke(app, ["embed", str(path)])
    assert result.exit_code == 2 and "this command runs 'embed' specs" in result.output

"""Promotion by evaluation on real Ray and MLflow: two pretrain jobs with `register.promote` (the first
takes the alias, the second is compared with it on the same data, the holder's value reused from its
tags), then an evaluate job with `promote` on other evaluation data, where both versions are
measured by the evaluate task."""

from __future__ import annotations

import pytest

from leoclr_core import tracking
from leoclr_core.settings import CoreSettings
from leoclr_core.spec.models import parse_spec

from .conftest import tiny_spec


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return CoreSettings(data_dir=tmp_path_factory.mktemp("promotion-data"))


def _pretrain(name: str, seed: int, tmp_path, settings):
    from leoclr_core.distributed.pretrain import run_pretrain

    spec = parse_spec(tiny_spec(name, tmp_path, seed=seed, optim={"epochs": 1, "batch_size": 64},
                                scaling={"num_workers": 1, "log_every": 2},
                                checkpoint={"storage_path": str(tmp_path / "ray")},
                                register={"model_name": "promo-encoder", "promote": {"alias": "champion"}}))
    return run_pretrain(spec, settings=settings)


def test_pretrains_then_an_evaluate_job_decide_the_champion(ray_cluster, tmp_path, settings):
    from leoclr_core.distributed.evaluate import run_evaluate

    first = _pretrain("promo-a", 0, tmp_path, settings)
    assert first.promotion["decision"] == "first" and first.promotion["candidate"] == first.state.final["knn_top1"]
    c = tracking.client(settings)
    assert tracking.alias_holder(c, "promo-encoder", "champion") == first.encoder.version

    second = _pretrain("promo-b", 1, tmp_path, settings)
    p = second.promotion
    a, b = first.state.final["knn_top1"], second.state.final["knn_top1"]
    assert (p["holder_version"], p["holder"], p["candidate"]) == (first.encoder.version, a, b)  # a's, reused
    assert p["decision"] == ("promoted" if b > a else "kept")
    champion = second.encoder.version if b > a else first.encoder.version
    assert tracking.alias_holder(c, "promo-encoder", "champion") == champion
    assert tracking.promotion_of("promo-encoder", second.encoder.version, settings)["decision"] == p["decision"]

    # The version that lost, evaluated on other data: both measured there, by the evaluate task.
    loser = first.encoder.version if champion == second.encoder.version else second.encoder.version
    data = tiny_spec("x", tmp_path)["data"] | {"seed": 7}
    spec = parse_spec({"kind": "evaluate", "name": "promo-eval", "encoder": {"model_uri": f"models:/promo-encoder/{loser}"},
                       "data": data, "eval": {"knn_k": 20}, "scaling": {"cpus_per_worker": 1},
                       "output_dir": str(tmp_path / "eval"), "promote": {"alias": "champion"}})
    result = run_evaluate(spec, settings=settings)
    q = result["promotion"]
    assert q["candidate"] == result["knn_top1"] and q["holder_version"] == champion
    assert tracking.stored_score(c, "promo-encoder", champion, q["data"], "knn_top1") == q["holder"]  # measured
    assert q["data"] == tracking.eval_fingerprint(spec.data, spec.eval, "knn_top1") != p["data"]
    assert q["decision"] == ("promoted" if q["candidate"] > q["holder"] else "kept")
    holder_now = tracking.alias_holder(c, "promo-encoder", "champion")
    assert holder_now == (loser if q["decision"] == "promoted" else champion)

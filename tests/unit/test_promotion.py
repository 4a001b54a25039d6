"""Promotion by evaluation (leoclr_core.tracking.promote): the alias moves to a version only when it
beats the holder on the same evaluation data, the decision is tagged on the version, decisions
made at once are serialised by a lock the registry provides, and the API and `leoclr models` show
them. MLflow on SQLite in a temp folder; versions registered without artifacts (nothing is loaded)."""

from __future__ import annotations

import threading
import time

import pytest

from leoclr_core import contract, tracking
from leoclr_core.settings import CoreSettings
from leoclr_core.spec.models import DataSpec, EvalSpec, PromoteSpec, SpecError, parse_spec

from .fakes import AUTH, make_client, mlflow_store  # noqa: F401 - a fixture

@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); each test registers its own model."""
    tmp = tmp_path_factory.mktemp("promotion")
    uri, ml = mlflow_store(tmp)
    return CoreSettings(data_dir=tmp / "data", mlflow_tracking_uri=uri), ml, tmp


@pytest.fixture()
def store(db, request):
    """(settings, client, register(n) -> versions, the name of a model of this test's own)."""
    settings, ml, tmp = db
    name = f"enc-{request.node.name.replace('[', '-').replace(']', '').replace('.', '_')}"[:100]
    ml.create_registered_model(name)

    def register(count: int = 1) -> list[str]:
        return [str(ml.create_model_version(name, source=f"{tmp}/m", run_id=None).version) for _ in range(count)]

    return settings, ml, register, name


def holder_of(ml, name: str, alias: str = "champion") -> str | None:
    return tracking.alias_holder(ml, name, alias)


def never(version: str) -> float:
    raise AssertionError(f"version {version} was measured, but no version held the alias")


def test_the_first_version_takes_the_alias(store):
    settings, ml, register, name = store
    [v] = register()
    d = tracking.promote(name, v, PromoteSpec(), 40.0, never, settings=settings)
    assert (d.decision, d.candidate, d.holder, d.holder_version) == ("first", 40.0, None, None)
    assert holder_of(ml, name) == v
    recorded = tracking.promotion_of(name, v, settings)
    assert recorded["decision"] == "first" and recorded["candidate"] == 40.0 and recorded["holder"] is None
    assert recorded["alias"] == "champion" and recorded["metric"] == "knn_top1"
    assert not ml.search_registered_models(f"name LIKE '{contract.PROMOTION_LOCK_PREFIX}{name}%'")  # released


def test_a_worse_candidate_is_kept_with_both_numbers_and_the_holder_measured_once(store):
    settings, ml, register, name = store
    first, worse, also_worse = register(3)
    tracking.promote(name, first, PromoteSpec(), 60.0, never, settings=settings)
    measured = []

    def measure(version: str) -> float:
        measured.append(version)
        return 58.5  # the holder on this job's data: what is compared, not its own 60.0 on other data

    fp = tracking.eval_fingerprint(DataSpec(), EvalSpec(), "knn_top1")
    d = tracking.promote(name, worse, PromoteSpec(), 55.0, measure, data_fingerprint=fp, settings=settings)
    assert (d.decision, d.candidate, d.holder, d.holder_version) == ("kept", 55.0, 58.5, first)
    assert holder_of(ml, name) == first and measured == [first]
    tags = ml.get_model_version(name, worse).tags
    assert (tags[contract.TAG_PROMOTION_CANDIDATE], tags[contract.TAG_PROMOTION_HOLDER]) == ("55.0", "58.5")
    assert tags[contract.TAG_PROMOTION_HOLDER_VERSION] == first and tags[contract.TAG_PROMOTION_DATA] == fp
    # The holder's value on these data is on it now: the next decision on the same data reuses it ...
    d = tracking.promote(name, also_worse, PromoteSpec(), 57.0, measure, data_fingerprint=fp, settings=settings)
    assert (d.decision, d.holder) == ("kept", 58.5) and measured == [first]
    # ... and one on other data measures it again.
    other = tracking.eval_fingerprint(DataSpec(seed=1), EvalSpec(), "knn_top1")
    assert other != fp and other != tracking.eval_fingerprint(DataSpec(), EvalSpec(knn_k=20), "knn_top1")
    tracking.promote(name, also_worse, PromoteSpec(), 57.0, measure, data_fingerprint=other, settings=settings)
    assert measured == [first, first]


@pytest.mark.parametrize("candidate, min_delta, decision", [
    (50.5, 0.5, "promoted"), (50.4, 0.5, "kept"), (50.0, 0.0, "kept"), (50.1, 0.0, "promoted")])
def test_a_better_candidate_takes_the_alias_only_by_min_delta_and_a_tie_never(store, candidate, min_delta, decision):
    settings, ml, register, name = store
    first, second = register(2)
    tracking.promote(name, first, PromoteSpec(), 50.0, never, settings=settings)
    d = tracking.promote(name, second, PromoteSpec(min_delta=min_delta), candidate, lambda v: 50.0,
                         settings=settings)
    assert d.decision == decision and d.holder == 50.0
    assert holder_of(ml, name) == (second if decision == "promoted" else first)
    assert ml.get_model_version(name, second).tags[contract.TAG_PROMOTION_DECISION] == decision


def test_mode_min_promotes_the_lower_value(store):
    settings, ml, register, name = store
    first, second = register(2)
    tracking.promote(name, first, PromoteSpec(mode="min"), 9.0, never, settings=settings)
    assert tracking.promote(name, second, PromoteSpec(mode="min"), 8.0, lambda v: 9.0,
                            settings=settings).decision == "promoted"
    assert holder_of(ml, name) == second


def test_a_holder_that_moves_while_it_is_measured_is_measured_again(store):
    """The decision compares with the holder it replaces: read again inside the lock."""
    settings, ml, register, name = store
    first, faster, slow = register(3)
    tracking.promote(name, first, PromoteSpec(), 50.0, never, settings=settings)
    scores = {first: 50.0, faster: 70.0}

    def measure(version: str) -> float:
        if version == first:  # meanwhile another job promotes a better version
            tracking.promote(name, faster, PromoteSpec(), 70.0, scores.get, settings=settings)
        return scores[version]

    d = tracking.promote(name, slow, PromoteSpec(), 60.0, measure, settings=settings)
    assert (d.decision, d.holder_version, d.holder) == ("kept", faster, 70.0)
    assert holder_of(ml, name) == faster


def test_decisions_made_at_once_leave_one_holder_the_best_that_beat_the_first(store):
    settings, ml, register, name = store
    initial, *candidates = register(9)
    tracking.promote(name, initial, PromoteSpec(), 50.0, never, settings=settings)
    values = {initial: 50.0}
    for i, v in enumerate(candidates):  # some below, some above the initial holder, all distinct
        values[v] = [41.0, 63.0, 49.0, 58.0, 66.5, 52.0, 45.0, 61.0][i]
    start = threading.Barrier(len(candidates))
    decisions, errors = {}, []

    def decide(v: str) -> None:
        try:
            start.wait()
            decisions[v] = tracking.promote(name, v, PromoteSpec(), values[v], values.__getitem__, settings=settings)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=decide, args=(v,)) for v in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    best = max((v for v in candidates if values[v] > values[initial]), key=values.__getitem__)
    assert holder_of(ml, name) == best
    # Consistent with the final state: every decision compared with the value of the version it names,
    # and the promotions form one chain from the initial holder to the final one: no two versions won
    # against the same holder.
    recorded = {v: tracking.promotion_of(name, v, settings) for v in candidates}
    for v, r in recorded.items():
        assert r == {k: getattr(decisions[v], k) for k in r}
        assert r["holder"] == values[r["holder_version"]] and r["candidate"] == values[v]
        assert (r["candidate"] > r["holder"]) == (r["decision"] == "promoted")
    won = {}
    for v, r in recorded.items():
        if r["decision"] == "promoted":
            assert r["holder_version"] not in won, f"{v} and {won.get(r['holder_version'])} both replaced it"
            won[r["holder_version"]] = v
    chain, at = [initial], initial
    while at in won:
        at = won.pop(at)
        chain.append(at)
    assert not won and chain[-1] == best


def test_a_lock_left_by_a_dead_holder_is_broken_after_its_lease_and_a_live_one_is_not(store):
    settings, ml, register, name = store
    first, second = register(2)
    lock = f"{contract.PROMOTION_LOCK_PREFIX}{name}"
    ml.create_registered_model(lock, tags={tracking.LOCK_OWNER_TAG: "alive", tracking.LOCK_LEASE_TAG: "3600"})
    with pytest.raises(TimeoutError, match=lock):
        tracking.promote(name, first, PromoteSpec(), 50.0, never, settings=settings, wait_s=0.5)
    assert holder_of(ml, name) is None and ml.get_registered_model(lock).tags[tracking.LOCK_OWNER_TAG] == "alive"
    ml.delete_registered_model(lock)
    ml.create_registered_model(lock, tags={tracking.LOCK_OWNER_TAG: "dead", tracking.LOCK_LEASE_TAG: "0.3"})
    time.sleep(0.4)
    d = tracking.promote(name, first, PromoteSpec(), 50.0, never, settings=settings, wait_s=30)
    assert d.decision == "first" and holder_of(ml, name) == first
    names = {m.name for m in ml.search_registered_models(f"name LIKE '{lock}%'")}
    assert names == {f"{lock}.broken-dead"}  # broken once, by one waiter; the new holder released its own


def test_two_waiters_breaking_one_stale_lock_do_not_both_delete(store):
    """The second breaker of the same dead owner finds the tombstone and leaves the lock alone."""
    settings, ml, register, name = store
    c = tracking.client(settings)
    lock = f"{contract.PROMOTION_LOCK_PREFIX}{name}"
    ml.create_registered_model(lock, tags={tracking.LOCK_OWNER_TAG: "dead", tracking.LOCK_LEASE_TAG: "0.1"})
    time.sleep(0.2)
    a, b = tracking.RegistryLock(c, name, lease_s=30), tracking.RegistryLock(c, name, lease_s=30)
    a._break_if_stale()
    with a:  # a holds a fresh lock now; b read the dead owner's before: its break must not delete a's
        ml.create_registered_model(lock + ".tmp")  # (any registry write in between)
        b._break_if_stale()
        assert ml.get_registered_model(lock).tags[tracking.LOCK_OWNER_TAG] == a.owner


def test_the_candidate_holding_the_alias_already_is_not_decided_again(store):
    settings, ml, register, name = store
    [v] = register()
    tracking.promote(name, v, PromoteSpec(), 50.0, never, settings=settings)
    d = tracking.promote(name, v, PromoteSpec(), 50.0, never, settings=settings)
    assert d.decision == "first" and holder_of(ml, name) == v


def test_the_api_and_the_models_table_show_each_versions_promotion(store, make_client, capsys, monkeypatch):
    from leoclr_core.cli import display

    settings, ml, register, name = store
    first, second = register(2)
    tracking.promote(name, first, PromoteSpec(), 50.0, never, settings=settings)
    tracking.promote(name, second, PromoteSpec(min_delta=1.0), 50.5, lambda v: 50.0, settings=settings)
    with make_client(mlflow_tracking_uri=settings.tracking_uri) as c:
        items = c.get("/v1/models", headers=AUTH).json()["items"]
        names = [m["name"] for m in items]
        assert name in names and not [n for n in names if n.startswith(contract.PROMOTION_LOCK_PREFIX)]
        model = c.get(f"/v1/models/{name}", headers=AUTH).json()
    by_version = {v["version"]: v["promotion"] for v in model["versions"]}
    assert by_version[first]["decision"] == "first" and model["aliases"]["champion"] == first
    kept = by_version[second]
    assert (kept["decision"], kept["candidate"], kept["holder"], kept["holder_version"]) == ("kept", 50.5, 50.0, first)
    assert display.promotion_cell(kept) == f"kept @champion 50.50 vs 50.00 (v{first})"
    assert display.promotion_cell(by_version[first]) == "first @champion 50.00"
    monkeypatch.setattr(display.console, "_width", 250)  # one line per row
    display.models_table(items)
    assert display.promotion_cell(kept) in capsys.readouterr().err  # rich's console writes to stderr


def test_promotion_specs_are_checked():
    spec = parse_spec({"register": {"model_name": "m", "promote": {"min_delta": 0.5}}})
    assert spec.register.promote == PromoteSpec(alias="champion", metric="knn_top1", min_delta=0.5, mode="max")
    assert parse_spec({}).register.promote is None  # old specs unchanged
    for raw, message in [
        ({"register": {"promote": {}}}, "promote needs model_name"),
        ({"register": {"model_name": "m", "promote": {"alias": "candidate"}}}, "must differ"),
        ({"register": {"model_name": "m", "promote": {"alias": "latest"}}}, "reserved"),
        ({"register": {"model_name": "m", "promote": {"metric": "loss"}}}, "register.promote.metric"),
        ({"register": {"model_name": "m", "promote": {"metric": "linear_top1"}}}, "eval.linear_probe"),
        ({"register": {"model_name": "m", "promote": {"min_delta": -1}}}, "min_delta"),
        ({"kind": "evaluate", "encoder": {"checkpoint": "x"}, "promote": {}}, "models:/"),
        ({"kind": "evaluate", "encoder": {"model_uri": "models:/m@a"}, "promote": {"metric": "linear_top1"}},
         "not measured by protocol"),
        ({"kind": "tune", "base": {}, "space": {"optim.lr": {"type": "choice", "values": [0.1]}},
          "register": {"model_name": "m", "promote": {}}}, "not run by a search"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec(raw)
    ok = parse_spec({"kind": "evaluate", "encoder": {"model_uri": "models:/m/3"}, "promote": {}})
    assert ok.promote.alias == "champion"

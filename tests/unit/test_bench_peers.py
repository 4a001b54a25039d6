"""The side-by-side with lightly at a toy scale: every row trains, the work is counted, unequal rows
get no ratio."""

import copy
import json

import pytest
import torch

pytest.importorskip("lightly")

from bench import peers  # noqa: E402
from leoclr_core.spec.models import load_spec  # noqa: E402

from .bench_shared import TINY_BENCH_SPEC, one_thread  # noqa: F401 - one_thread is a fixture

TINY = {**TINY_BENCH_SPEC, "name": "tiny-peers"}
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_spec(tmp_path, overrides=()):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(TINY))  # JSON is YAML
    return load_spec(path, list(overrides))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    spec = tiny_spec(tmp_path_factory.mktemp("peers"))
    return peers.run_peers(spec, device=torch.device("cpu"), steps=3, warmup=1, data="synthetic", workers=0,
                           max_images=64)


def test_every_row_trains_with_a_finite_loss(result):
    assert [r["row"] for r in result["rows"]] == list(peers.ROWS)
    for r in result["rows"]:
        assert len(r["losses"]) == 3 and r["loss"]["finite"], r["row"]
        assert r["inst_per_s"] > 0 and 0 <= r["input_wait_share"] <= 1
        assert r["cpu_s"] is None or r["cpu_s"] >= 0


def test_forwards_per_instance_are_counted_per_row(result):
    forwards = {r["row"]: r["settings"]["forwards_per_instance"] for r in result["rows"]}
    assert forwards["lightly-mocov2"] == forwards["ours-mocov2"] == {"query": 1.0, "key": 1.0}
    assert forwards["lightly-leoclr"] == forwards["ours-leoclr"] == {"query": 1.0, "key": 2.0}


def test_the_matching_rows_do_the_same_work(result):
    """Read back from the transforms lightly runs, the augmentation equals ours; so does everything else."""
    rows = {r["row"]: r for r in result["rows"]}
    for method in ("mocov2", "leoclr"):
        assert peers.setting_differences(rows[f"ours-{method}"]["settings"],
                                         rows[f"lightly-{method}"]["settings"]) == []
    cross = peers.setting_differences(rows["ours-leoclr"]["settings"], rows["lightly-mocov2"]["settings"])
    assert any(d.startswith("forwards_per_instance.key (2 vs 1)") for d in cross)
    assert "augmentation.original (only in the first row)" in cross


def _row(name, rate, per_cpu_s=None, **settings):
    base = {"queue_size": 32, "temperature": 0.2, "forwards_per_instance": {"query": 1.0, "key": 2.0}}
    loss = {"finite": True, "decreasing": True}
    return {"row": name, "inst_per_s": rate, "inst_per_cpu_s": per_cpu_s, "settings": {**base, **settings},
            "loss": loss}


def test_a_ratio_only_for_rows_with_the_same_settings_and_a_decreasing_loss():
    ours, peer = _row("ours-leoclr", 300.0, 200.0), _row("lightly-leoclr", 100.0, 50.0)
    assert peers.ratio_or_refusal(ours, peer) == {"ours": "ours-leoclr", "peer": "lightly-leoclr",
                                                  "ratio": 3.0, "cpu_ratio": 4.0, "refused": None}

    hotter = _row("lightly-leoclr", 100.0, temperature=0.5)
    out = peers.ratio_or_refusal(ours, hotter)
    assert out["ratio"] is None and out["refused"] == ["temperature (0.2 vs 0.5)"]

    stalled = copy.deepcopy(peer)
    stalled["loss"]["decreasing"] = False
    out = peers.ratio_or_refusal(ours, stalled)
    assert out["ratio"] is None and "lightly-leoclr: the loss did not decrease" in out["refused"][0]


def test_an_augmentation_difference_in_lightly_s_transform_is_found(tmp_path):
    spec = tiny_spec(tmp_path)
    blurrier = tiny_spec(tmp_path, ["augment.blur_p=0.3"])
    theirs = peers.lightly_augmentation(peers.lightly_views(blurrier, "leoclr"), "leoclr")
    diffs = peers.setting_differences(peers.ours_augmentation(spec, ("original", "crop", "crop")), theirs)
    assert diffs == ["crop.blur_p (0.5 vs 0.3)", "original.blur_p (0.5 vs 0.3)"]


def test_the_loss_is_judged_on_the_first_and_last_quarter():
    assert peers.judge_loss([5.0, 4.9, 5.1, 4.0])["decreasing"]
    assert not peers.judge_loss([4.0, 4.9, 5.1, 5.0])["decreasing"]
    bad = peers.judge_loss([5.0, float("nan"), 4.0, 3.0])
    assert not bad["finite"] and not bad["decreasing"]


def test_one_ntxent_call_is_leoclr_s_loss_and_enqueue():
    """lightly's NTXentLoss on (q, q) against (k1, k2) is LeOCLR's loss against the same bank, and the
    bank then holds k1 and k2, as our queue does after the step."""
    from lightly.loss import NTXentLoss

    from leoclr_core.nn.losses import leoclr_loss
    from leoclr_core.nn.model import KeyQueue

    torch.manual_seed(0)
    b, dim, size = 4, 8, 16
    q, k1, k2 = (torch.nn.functional.normalize(torch.randn(b, dim), dim=1) for _ in range(3))
    q.requires_grad_(True)  # lightly updates its bank only when the loss will be backpropagated
    queue = KeyQueue(size, dim)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(size, dim))
    criterion.memory_bank.bank.copy_(queue.keys)
    ours = leoclr_loss(q, k1, k2, queue.keys, 0.2)
    theirs = criterion(torch.cat([q, q]), torch.cat([k1, k2]))
    torch.testing.assert_close(theirs, ours)
    queue.enqueue(torch.cat([k1, k2]))
    torch.testing.assert_close(criterion.memory_bank.bank, queue.keys)

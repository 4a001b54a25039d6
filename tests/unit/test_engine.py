"""The training step's order and its distributed behaviour (LEOCLR.md's pitfalls)."""

import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import leoclr_core.nn.methods as methods_mod
from leoclr_core.training.engine import Runtime, build_optimizer, lr_factor, prepare_method, train_step
from leoclr_core.nn.methods import build_method
from leoclr_core.spec.models import LossSpec, ModelSpec, OptimSpec

MODEL = ModelSpec(backbone="tiny", width=4, proj_hidden_dim=16, proj_dim=8)
CPU = Runtime(device=torch.device("cpu"))


def make(method="leoclr", batch=8, **loss):
    torch.manual_seed(0)
    return build_method(method, MODEL, LossSpec(queue_size=32, **loss), batch_size=batch)


def views(n=3, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n))


def test_forward_reads_the_queue_but_never_writes_it():
    m = make()
    before = m.queue.keys.clone()
    m(views())
    assert torch.equal(m.queue.keys, before) and m.queue.ptr.item() == 0


def test_step_computes_the_loss_against_the_queue_before_enqueueing(monkeypatch):
    m = make()
    opt = build_optimizer(m, OptimSpec(lr=0.1, epochs=1))
    seen = {}
    real = methods_mod.leoclr_loss

    def spy(q, k1, k2, queue, t):
        seen["queue"], seen["keys"] = queue.clone(), torch.cat([k1, k2]).detach().clone()
        return real(q, k1, k2, queue, t)

    monkeypatch.setattr(methods_mod, "leoclr_loss", spy)
    before = m.queue.keys.clone()
    train_step(m, opt, views(), momentum=0.99, runtime=CPU)
    assert torch.equal(seen["queue"], before)  # the loss saw the old queue
    assert torch.allclose(m.queue.keys[:16], seen["keys"])  # then both crops' keys were enqueued
    assert m.queue.ptr.item() == 16


def test_enqueue_k1_only_option():
    m = make(enqueue="k1")
    opt = build_optimizer(m, OptimSpec(lr=0.1, epochs=1))
    train_step(m, opt, views(), momentum=0.99, runtime=CPU)
    assert m.queue.ptr.item() == 8


def test_key_encoder_gets_no_gradient_and_takes_the_ema_after_the_step():
    m = make()
    opt = build_optimizer(m, OptimSpec(lr=0.5, epochs=1))
    key_before = [p.clone() for p in m.key.parameters()]
    train_step(m, opt, views(), momentum=0.9, runtime=CPU)
    assert all(p.grad is None for p in m.key.parameters())
    for kb, k, q in zip(key_before, m.key.parameters(), m.query.parameters()):
        assert torch.allclose(k, 0.9 * kb + 0.1 * q, atol=1e-6)  # q is the query after its update


def test_only_the_query_encoder_is_optimised():
    m = make()
    opt = build_optimizer(m, OptimSpec(epochs=1))
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in m.query.parameters()}


def test_leoclr_encodes_the_original_with_the_query_and_crops_with_the_key(monkeypatch):
    m = make()
    calls = {"query": [], "key": []}
    m.query.register_forward_hook(lambda mod, inp, out: calls["query"].append(inp[0].shape[0]))
    m.key.register_forward_hook(lambda mod, inp, out: calls["key"].append(inp[0].shape[0]))
    x, x1, x2 = views()
    m((x, x1, x2))
    assert calls == {"query": [8], "key": [16]}  # both crops in one key forward


@pytest.mark.parametrize("symmetric,expected_keys", [(False, 8), (True, 16)])
def test_mocov2_baseline_uses_two_crops(symmetric, expected_keys):
    m = make("mocov2", symmetric=symmetric)
    out = m(views(2))
    assert out.keys.shape == (expected_keys, 8) and out.loss.ndim == 0


def test_symmetric_leoclr_adds_crop_to_original_terms():
    m = make(symmetric=True)
    out = m(views())
    assert torch.isfinite(out.loss) and out.keys.shape == (16, 8)


def test_split_bn_key_shuffle_is_undone():
    # In eval mode batch norm uses running stats, so the shuffle must be invisible in the output.
    m = make(key_bn="split", bn_splits=4)
    m.key.eval()
    x = views(1)[0]
    assert torch.allclose(m.encode_keys(x), m.key(x), atol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)


# ------------------------------------------------------------------ two gloo processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # same initial weights and queue on every worker
        m = build_method("leoclr", MODEL, LossSpec(queue_size=64), batch_size=4, distributed=True)
        assert m.key_bn == "shuffle"
        m = prepare_method(m, CPU)
        # shuffle-BN bookkeeping: with running stats the cross-worker shuffle must be invisible
        m.key.eval()
        x = views(1, batch=4, seed=100 + rank)[0]
        shuffled_ok = torch.allclose(m.encode_keys(x), m.key(x), atol=1e-6)
        m.key.train()
        opt = build_optimizer(m, OptimSpec(lr=0.1, epochs=1))
        out_keys = {}
        real_forward = m.forward

        def capture(v):
            out = real_forward(v)
            out_keys["k"] = out.keys.detach().clone()
            return out

        m.forward = capture  # type: ignore[method-assign]
        before = m.queue.keys.clone()
        train_step(m, opt, views(3, batch=4, seed=rank), momentum=0.99, runtime=CPU)
        results[rank] = {
            "queue": m.queue.keys.clone(),
            "ptr": m.queue.ptr.item(),
            "before": before,
            "local_keys": out_keys["k"],
            "query": [p.detach().clone() for p in m.query_encoder.parameters()],
            "shuffled_ok": shuffled_ok,
        }
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_gather_keys_before_enqueue_and_stay_in_sync():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, _free_port(), results), nprocs=2, join=True, start_method="spawn")
        r0, r1 = results[0], results[1]
    assert r0["shuffled_ok"] and r1["shuffled_ok"]
    # every worker enqueued the keys of both workers, in rank order: the queues are identical
    assert r0["ptr"] == r1["ptr"] == 2 * 8
    assert torch.equal(r0["queue"], r1["queue"])
    gathered = torch.cat([r0["local_keys"], r1["local_keys"]])
    assert torch.allclose(r0["queue"][:16], gathered, atol=1e-6)
    assert torch.equal(r0["queue"][16:], r0["before"][16:])
    # DDP averaged the gradients: both query encoders took the same step
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(r0["query"], r1["query"]))


def test_an_epoch_stops_with_a_clear_error_when_the_loss_is_not_finite():
    from leoclr_core.training.engine import build_scheduler, train_epoch

    method = prepare_method(make(), CPU)
    optimizer = build_optimizer(method, OptimSpec())
    scheduler = build_scheduler(optimizer, OptimSpec(epochs=1), steps_per_epoch=4)
    broken = tuple(torch.full((8, 3, 16, 16), float("nan")) for _ in range(3))
    batches = [views(), views(seed=2), broken, views(seed=3)]
    with pytest.raises(FloatingPointError, match="the training loss is nan at step 4"):
        train_epoch(method, optimizer, scheduler, batches, CPU, global_step=0, total_steps=4,
                    momentum_base=0.99, momentum_schedule="constant", log_every=2)

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leoclr_core.nn.losses import info_nce, leoclr_loss, mocov2_loss


def reference_info_nce(q, k, queue, t):
    """Independent float64 reference: one sample at a time, with numpy and the log-sum-exp by hand."""
    q, k, queue = (np.asarray(a, dtype=np.float64) for a in (q, k, queue))
    losses = []
    for i in range(q.shape[0]):
        pos = q[i] @ k[i] / t
        logits = np.concatenate([[pos], queue @ q[i] / t])
        top = logits.max()
        losses.append(-(pos - top - math.log(np.exp(logits - top).sum())))
    return float(np.mean(losses))


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("batch,dim,k,t", [(8, 16, 32, 0.2), (5, 128, 1000, 0.07), (3, 4, 0, 0.5)])
def test_info_nce_matches_float64_reference(batch, dim, k, t):
    q, key, queue = unit(batch, dim, seed=1), unit(batch, dim, seed=2), unit(k, dim, seed=3)
    got = info_nce(q, key, queue, t).item()
    assert got == pytest.approx(reference_info_nce(q, key, queue, t), rel=1e-5, abs=1e-6)


def test_info_nce_closed_form_with_orthogonal_negatives():
    # q == k and every negative orthogonal to q: loss = log(1 + K * exp(-1/t)).
    q = torch.eye(4)[:1]
    queue = torch.eye(4)[1:]
    t = 0.2
    assert info_nce(q, q, queue, t).item() == pytest.approx(math.log(1 + 3 * math.exp(-1 / t)), rel=1e-6)


def test_info_nce_is_zero_without_negatives_and_gradient_only_through_q():
    q = unit(4, 8).requires_grad_()
    k = unit(4, 8, seed=5).requires_grad_()
    assert info_nce(q, q.detach(), torch.empty(0, 8), 0.2).item() == pytest.approx(0.0, abs=1e-7)
    info_nce(q, k, unit(10, 8, seed=6), 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None  # stop-gradient on keys


def test_leoclr_loss_is_the_mean_of_both_crop_terms():
    q, k1, k2, queue = unit(6, 32, seed=1), unit(6, 32, seed=2), unit(6, 32, seed=3), unit(50, 32, seed=4)
    expected = 0.5 * (reference_info_nce(q, k1, queue, 0.2) + reference_info_nce(q, k2, queue, 0.2))
    assert leoclr_loss(q, k1, k2, queue, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_mocov2_loss_asymmetric_and_symmetric():
    q1, q2, k1, k2, queue = (unit(6, 32, seed=s) for s in range(5))
    asym = reference_info_nce(q1, k2, queue, 0.2)
    assert mocov2_loss(q1, k2, queue, 0.2).item() == pytest.approx(asym, rel=1e-5)
    sym = 0.5 * (asym + reference_info_nce(q2, k1, queue, 0.2))
    assert mocov2_loss(q1, k2, queue, 0.2, q2=q2, k1=k1).item() == pytest.approx(sym, rel=1e-5)
    with pytest.raises(ValueError, match="both q2 and k1"):
        mocov2_loss(q1, k2, queue, 0.2, q2=q2)


def test_losses_are_float32_under_bfloat16_inputs():
    q, k, queue = unit(4, 16).bfloat16(), unit(4, 16, seed=1).bfloat16(), unit(64, 16, seed=2).bfloat16()
    assert info_nce(q, k, queue, 0.2).dtype == torch.float32


@pytest.mark.parametrize(
    "args,match",
    [
        ((unit(4, 8), unit(3, 8), unit(2, 8), 0.2), "must both be"),
        ((unit(4, 8), unit(4, 8), unit(2, 7), 0.2), "queue must be"),
        ((unit(4, 8), unit(4, 8), unit(2, 8), 0.0), "temperature"),
    ],
)
def test_info_nce_rejects_bad_shapes_and_temperature(args, match):
    with pytest.raises(ValueError, match=match):
        info_nce(*args)

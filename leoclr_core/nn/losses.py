"""Contrastive losses as pure functions of tensors.

Inputs are already L2-normalised. The queue is read, never written: enqueueing is the engine's
job and happens only after every loss term of a step is computed (a key enqueued earlier would
become the negative of its own positive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -log softmax of the positive among [positive, queue negatives].

    q, k: (B, D) with row i of `k` the positive of row i of `q`; queue: (K, D) negatives, K may be 0.
    Logits are computed in float32 even under autocast: a bf16 softmax over 65k negatives loses
    the positive's contribution.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be (B, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or (queue.numel() and queue.shape[1] != q.shape[1]):
        raise ValueError(f"queue must be (K, {q.shape[1]}); got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    q = q.float()
    k = k.detach().float()
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().float().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def leoclr_loss(
    q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """LeOCLR: the original image's query pulled toward each crop's key, never crop toward crop.

    L = (l(q, k1) + l(q, k2)) / 2 with q = f_q(X), k_i = f_k(X_i).
    """
    return 0.5 * (info_nce(q, k1, queue, temperature) + info_nce(q, k2, queue, temperature))


def mocov2_loss(
    q1: torch.Tensor,
    k2: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    q2: torch.Tensor | None = None,
    k1: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo-v2: l(f_q(X1), f_k(X2)); symmetric when q2 and k1 are given (the mean of both directions)."""
    loss = info_nce(q1, k2, queue, temperature)
    if (q2 is None) != (k1 is None):
        raise ValueError("the symmetric MoCo-v2 loss needs both q2 and k1")
    if q2 is not None and k1 is not None:
        loss = 0.5 * (loss + info_nce(q2, k1, queue, temperature))
    return loss

"""torch.distributed helpers that are no-ops on one process (no Ray here: Ray Train sets up the group)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every worker along dim 0, in rank order. No gradient flows back:
    keys and shuffled images need none, and a gradient through a hand-made all_gather would
    bypass DDP's own all-reduce."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a metric tensor over workers (for logging only)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()

"""Methods as small declarations over a momentum base.

A method says which views it needs and how its loss is formed from query and key embeddings.
The base owns the query encoder, its momentum (key) copy, the key queue and the batch-norm
treatment of the key encoder. The engine decides when to step, update the EMA and enqueue.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from leoclr_core.nn import collectives as dist
from leoclr_core.nn.losses import info_nce, leoclr_loss, mocov2_loss
from leoclr_core.nn.model import Encoder, KeyQueue, build_encoder, convert_to_split_bn, update_momentum
from leoclr_core.spec.models import METHOD_VIEWS, LossSpec, ModelSpec


@dataclass
class StepOutput:
    loss: torch.Tensor
    keys: torch.Tensor  # to enqueue, after gathering across workers


class MomentumMethod(nn.Module):
    """Query encoder f_q (trained), key encoder f_k (EMA of f_q, no gradient), key queue."""

    # The kind of each view forward() takes, by default; a spec's `augment.views` may replace the
    # kinds (controls), never their number (`PretrainSpec.view_kinds` is what the feeds make).
    view_kinds: ClassVar[tuple[str, ...]]

    def __init__(self, model: ModelSpec, loss: LossSpec, batch_size: int, distributed: bool = False):
        super().__init__()
        self.cfg = loss
        self.query: nn.Module = build_encoder(model)
        self.key: nn.Module = copy.deepcopy(self.query)
        self.key.requires_grad_(False)
        self.queue = KeyQueue(loss.queue_size, model.proj_dim)
        mode = loss.key_bn
        if mode == "auto":
            mode = "shuffle" if distributed else "split"
        self.key_bn = mode
        if mode == "split":
            # The key batch holds every crop of the batch, so a divisor of the batch divides it too.
            splits = math.gcd(batch_size, loss.bn_splits)
            convert_to_split_bn(self.key, splits)

    @property
    def query_encoder(self) -> Encoder:
        """The query encoder without a DDP wrapper: what evaluation and export use."""
        q = self.query
        return q.module if isinstance(q, DistributedDataParallel) else q  # type: ignore[return-value]

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        update_momentum(self.query_encoder, self.key, m)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """f_k(x), with the batch shuffled so that batch-norm statistics cannot leak the pairing."""
        if self.key_bn == "none":
            return self.key(x)
        if self.key_bn == "shuffle" and dist.is_distributed():
            return self._shuffled_across_workers(x)
        perm = torch.randperm(x.shape[0], device=x.device)
        return self.key(x[perm])[torch.argsort(perm)]

    def _shuffled_across_workers(self, x: torch.Tensor) -> torch.Tensor:
        # MoCo's shuffle-BN: every worker normalises a random slice of the global batch.
        local = x.shape[0]
        gathered = dist.concat_all_gather(x)
        perm = torch.randperm(gathered.shape[0], device=x.device)
        torch.distributed.broadcast(perm, src=0)
        mine = perm.view(-1, local)[dist.rank()]
        keys = dist.concat_all_gather(self.key(gathered[mine]))
        return keys[torch.argsort(perm)].view(-1, local, keys.shape[1])[dist.rank()]

    def forward(self, views: tuple[torch.Tensor, ...]) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class LeOCLR(MomentumMethod):
    """q = f_q(X) on the uncropped image; k1, k2 = f_k(X1), f_k(X2); each crop pulled toward X."""

    view_kinds = ("original", "crop", "crop")

    def forward(self, views: tuple[torch.Tensor, ...]) -> StepOutput:
        x, x1, x2 = views
        t, queue = self.cfg.temperature, self.queue.keys
        if not self.cfg.symmetric:
            q = self.query(x)
            k1, k2 = self.encode_keys(torch.cat([x1, x2])).chunk(2)
            loss = leoclr_loss(q, k1, k2, queue, t)
        else:
            # One query forward for all three views: DDP allows a single forward per backward.
            q, q1, q2 = self.query(torch.cat([x, x1, x2])).chunk(3)
            kx, k1, k2 = self.encode_keys(torch.cat([x, x1, x2])).chunk(3)
            crops_to_original = 0.5 * (info_nce(q1, kx, queue, t) + info_nce(q2, kx, queue, t))
            loss = 0.5 * (leoclr_loss(q, k1, k2, queue, t) + crops_to_original)
        keys = torch.cat([k1, k2]) if self.cfg.enqueue == "both" else k1
        return StepOutput(loss, keys)


class MoCoV2(MomentumMethod):
    """The baseline: q = f_q(X1), k = f_k(X2); symmetric adds l(f_q(X2), f_k(X1))."""

    view_kinds = ("crop", "crop")

    def forward(self, views: tuple[torch.Tensor, ...]) -> StepOutput:
        x1, x2 = views
        t, queue = self.cfg.temperature, self.queue.keys
        if not self.cfg.symmetric:
            q1 = self.query(x1)
            k2 = self.encode_keys(x2)
            return StepOutput(mocov2_loss(q1, k2, queue, t), k2)
        q1, q2 = self.query(torch.cat([x1, x2])).chunk(2)
        k1, k2 = self.encode_keys(torch.cat([x1, x2])).chunk(2)
        return StepOutput(mocov2_loss(q1, k2, queue, t, q2=q2, k1=k1), torch.cat([k1, k2]))


METHOD_REGISTRY: dict[str, type[MomentumMethod]] = {"leoclr": LeOCLR, "mocov2": MoCoV2}
assert {k: m.view_kinds for k, m in METHOD_REGISTRY.items()} == METHOD_VIEWS, \
    "spec.METHOD_VIEWS and the methods' view_kinds must agree"


def build_method(
    name: str, model: ModelSpec, loss: LossSpec, batch_size: int, distributed: bool = False
) -> MomentumMethod:
    if name not in METHOD_REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_REGISTRY)}")
    return METHOD_REGISTRY[name](model, loss, batch_size, distributed)

"""One training step and one epoch, in plain PyTorch, on any device, with or without torch.distributed.

Order inside a step (LEOCLR.md's pitfalls): every loss term is computed against the queue as it
was; the optimiser steps; the key encoder takes its EMA step; only then are the keys gathered
across workers and enqueued. No `.item()` inside a step: the loss is read back at log intervals.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.nn.parallel import DistributedDataParallel

from leoclr_core.nn import collectives as dist
from leoclr_core.nn.methods import MomentumMethod
from leoclr_core.nn.model import momentum_at
from leoclr_core.spec.models import OptimSpec, ScalingSpec


@dataclass(frozen=True)
class Runtime:
    """How tensors are computed: device, autocast dtype, memory format, compilation."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def view_dtype(self) -> torch.dtype:
        """The dtype batched views are made in: float16 on CUDA when the model reads its input
        through autocast (which casts it to bf16 anyway; half the views' memory traffic), else float32."""
        cuda_autocast = self.device.type == "cuda" and self.autocast_dtype is not None
        return torch.float16 if cuda_autocast else torch.float32

    @property
    def compile_views(self) -> bool:
        """Batched views are compiled along with a compiled model on CUDA (where fusing their dozens
        of elementwise passes pays; on a CPU the chunked eager path is as fast)."""
        return self.compile and self.device.type == "cuda"

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t


def resolve_runtime(scaling: ScalingSpec, device: torch.device | str | None = None) -> Runtime:
    """fp32 on CPU (bf16 autocast is ~10x slower on CPUs without AMX); bf16 + channels_last on CUDA."""
    if device is None:
        device = "cuda" if scaling.use_gpu and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    precision = scaling.precision if scaling.precision != "auto" else ("bf16" if cuda else "fp32")
    channels_last = scaling.channels_last == "on" or (scaling.channels_last == "auto" and cuda)
    return Runtime(
        device=device,
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        channels_last=channels_last,
        compile=scaling.compile,
    )


def prepare_method(method: MomentumMethod, runtime: Runtime) -> MomentumMethod:
    """Move to the device, set the memory format, wrap the query encoder in DDP when distributed."""
    method.to(runtime.device)
    if runtime.channels_last:
        method.to(memory_format=torch.channels_last)
    if dist.is_distributed() and not isinstance(method.query, DistributedDataParallel):
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        method.query = DistributedDataParallel(method.query, device_ids=ids)
    if runtime.compile:
        method.query.compile()
        method.key.compile()
    return method


def build_optimizer(method: MomentumMethod, optim: OptimSpec) -> torch.optim.Optimizer:
    """SGD with momentum; on CUDA the fused kernel (one launch for every parameter's update)."""
    params = list(method.query_encoder.parameters())
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.SGD(
        params,
        lr=optim.lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        fused=fused or None,
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup, then cosine decay to 0 (or constant), as a factor of the base lr."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimSpec, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total, warmup = optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, optim.schedule)
    )


def train_step(
    method: MomentumMethod,
    optimizer: torch.optim.Optimizer,
    views: tuple[torch.Tensor, ...],
    momentum: float,
    runtime: Runtime,
) -> torch.Tensor:
    """One optimisation step; returns the detached loss, still on the device."""
    with runtime.autocast():
        out = method(views)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    method.momentum_update(momentum)
    # Only keys gathered from every worker enter the queue, and only after the loss used it.
    method.queue.enqueue(dist.concat_all_gather(out.keys.float()))
    return out.loss.detach()


def check_finite(loss: float, step: int) -> None:
    """Stop a run whose loss is NaN or infinite: every step after it would train on garbage.

    The value is all-reduced, so every worker sees it and stops at the same step (no DDP hang).
    """
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss} at step {step}: the run diverged or its input is broken "
            "(a lower optim.lr, or a look at the data, usually tells which)")


@dataclass
class EpochResult:
    loss: float
    steps: int
    instances: int
    seconds: float
    last_lr: float
    last_momentum: float

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0


def train_epoch(
    method: MomentumMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[torch.Tensor, ...]],
    runtime: Runtime,
    *,
    global_step: int,
    total_steps: int,
    momentum_base: float,
    momentum_schedule: str,
    log_every: int = 10,
    on_log: Callable[[dict], None] | None = None,
) -> EpochResult:
    """Run the steps of one epoch over `batches` (tuples of views already on the device).

    `global_step` is the step count before this epoch, so a resumed run continues the lr and
    momentum schedules where it stopped. `on_log` receives a metrics dict every `log_every` steps.
    """
    method.train()
    loss_sum = torch.zeros((), device=runtime.device)
    window_loss = torch.zeros((), device=runtime.device)
    steps = instances = window_steps = window_instances = 0
    m = momentum_base
    start = window_start = time.perf_counter()
    for views in batches:
        m = momentum_at(momentum_base, global_step, total_steps, momentum_schedule)
        loss = train_step(method, optimizer, views, m, runtime)
        scheduler.step()
        global_step += 1
        steps += 1
        window_steps += 1
        n = views[0].shape[0] * dist.world_size()
        instances += n
        window_instances += n
        loss_sum += loss
        window_loss += loss
        if window_steps == log_every:
            now = time.perf_counter()
            window_mean = float(dist.all_reduce_mean(window_loss / window_steps))  # the one sync per window
            check_finite(window_mean, global_step)
            record = {
                "step": global_step,
                "loss": window_mean,
                "lr": optimizer.param_groups[0]["lr"],
                "momentum": m,
                "instances_per_s": window_instances / max(now - window_start, 1e-9),
            }
            if on_log is not None:
                on_log(record)
            window_loss.zero_()
            window_steps = window_instances = 0
            window_start = now
    seconds = time.perf_counter() - start
    mean_loss = float(dist.all_reduce_mean(loss_sum / max(steps, 1)))
    check_finite(mean_loss, global_step)
    return EpochResult(
        loss=mean_loss,
        steps=steps,
        instances=instances,
        seconds=seconds,
        last_lr=optimizer.param_groups[0]["lr"],
        last_momentum=m,
    )

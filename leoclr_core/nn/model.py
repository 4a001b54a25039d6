"""Encoders and the momentum machinery: backbones by name, projection head, EMA, key queue, split BN.

Each part stands alone so that a user can take one (say `KeyQueue`) into their own code.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from leoclr_core.spec.models import BACKBONES, ModelSpec


# ---------------------------------------------------------------- backbones
def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyConvNet(nn.Module):
    """A small convnet for CPU demos and tests: four stages, ~0.5 M parameters at width 32.

    Like the CIFAR ResNet stem it keeps full resolution in the first stage, so 32 px images work.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stages = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w, stride=2),
            _conv_bn(2 * w, 2 * w),
            _conv_bn(2 * w, 4 * w, stride=2),
            _conv_bn(4 * w, 4 * w),
            _conv_bn(4 * w, 8 * w, stride=2),
        )
        self.out_dim = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(x), 1), 1)


def _torchvision_resnet(name: str) -> Callable[[ModelSpec], tuple[nn.Module, int]]:
    def build(spec: ModelSpec) -> tuple[nn.Module, int]:
        net = getattr(torchvision.models, name)(weights=None)
        if spec.cifar_stem:
            # 3x3 stride-1 first conv and no max-pool: small images keep their resolution.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim

    return build


def _tiny(spec: ModelSpec) -> tuple[nn.Module, int]:
    net = TinyConvNet(spec.width)
    return net, net.out_dim


BACKBONE_REGISTRY: dict[str, Callable[[ModelSpec], tuple[nn.Module, int]]] = {
    "tiny": _tiny,
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet34": _torchvision_resnet("resnet34"),
    "resnet50": _torchvision_resnet("resnet50"),
}
assert tuple(BACKBONE_REGISTRY) == BACKBONES, "spec.BACKBONES and the registry must name the same backbones"


def build_backbone(spec: ModelSpec) -> tuple[nn.Module, int]:
    """The backbone (images -> features, no classifier) and its feature dimension."""
    if spec.backbone not in BACKBONE_REGISTRY:
        raise ValueError(f"unknown backbone {spec.backbone!r}; known: {', '.join(BACKBONE_REGISTRY)}")
    return BACKBONE_REGISTRY[spec.backbone](spec)


# ---------------------------------------------------------------- encoder
class ProjectionHead(nn.Sequential):
    """MoCo-v2's 2-layer MLP head (no batch norm, so the head adds no batch-statistics leak)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class Encoder(nn.Module):
    """Backbone + projection head; `forward` gives L2-normalised embeddings, `features` the backbone's."""

    def __init__(self, backbone: nn.Module, feat_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(feat_dim, hidden_dim, out_dim)
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build_encoder(spec: ModelSpec) -> Encoder:
    backbone, dim = build_backbone(spec)
    return Encoder(backbone, dim, spec.proj_hidden_dim, spec.proj_dim)


class ImageEncoder(nn.Module):
    """The encoder a user pulls from the registry: float images in [0, 1], shape (N, 3, H, W),
    in; backbone features (N, D) out. It normalises with the statistics it was trained with,
    so callers need to know nothing but the image size (`image_size`, the training view size).
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], image_size: int):
        super().__init__()
        self.backbone = backbone
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected float images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        return self.backbone((images.float() - self.mean) / self.std)


# ---------------------------------------------------------------- momentum
@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online, for parameters only, in one fused foreach op.

    Buffers (batch-norm running statistics) stay the target's own, as in MoCo.
    """
    tgt = [p for p in target.parameters()]
    src = [p.detach() for p in online.parameters()]
    if len(tgt) != len(src):
        raise ValueError("online and target encoders must have the same parameters")
    torch._foreach_lerp_(tgt, src, 1.0 - m)


def momentum_at(base: float, step: int, total_steps: int, schedule: str) -> float:
    """EMA momentum at `step`: constant, or BYOL's cosine increase from `base` to 1."""
    if schedule == "constant" or total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


# ---------------------------------------------------------------- queue
class KeyQueue(nn.Module):
    """A FIFO of past keys, the negatives of MoCo-style losses.

    `keys` (K, dim) and `ptr` are buffers, so checkpoints carry them. The queue changes only in
    `enqueue`, which the engine calls after the step's loss is computed and the keys gathered.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0 or dim <= 0:
            raise ValueError(f"queue size must be >= 0 and dim > 0, got size={size}, dim={dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (N, dim) at the pointer, wrapping around; the oldest keys are overwritten.

        The pointer stays on the device, so no host-device sync happens here.
        """
        size = self.size
        if size == 0:
            return
        keys = keys.detach().to(self.keys.dtype)
        if keys.shape[0] > size:
            keys = keys[-size:]
        n = keys.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % size
        self.keys.index_copy_(0, idx, keys)
        self.ptr.copy_((self.ptr + n) % size)


# ---------------------------------------------------------------- split batch norm
class SplitBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics come from `num_splits` sub-batches.

    On one worker it stands in for MoCo's shuffle-BN: with the batch shuffled before the key
    encoder, a key's statistics no longer come from the same samples as its query's. Sub-batches
    are contiguous chunks of the batch: the batch dimension is outermost in both memory formats,
    so the split is a free view (an interleaved split copies every activation of a channels_last
    network, which cost 40% of a ResNet-50 step on an H200). In eval mode it is a BatchNorm2d.
    """

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s:
            raise ValueError(f"batch of {n} is not divisible into {s} batch-norm splits")
        xs = x.view(s, n // s, c, h, w)
        var, mean = torch.var_mean(xs, dim=(1, 3, 4), keepdim=True, correction=0)
        var, mean = var.float(), mean.float()
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(1, 1, c, 1, 1)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.view(1, 1, c, 1, 1)
        # One fused pass over the activations: x * scale + shift, in the activations' dtype.
        out = torch.addcmul(shift.to(x.dtype), xs, scale.to(x.dtype))
        if self.track_running_stats:
            with torch.no_grad():
                count = (n // s) * h * w
                unbiased = var * (count / max(count - 1, 1))
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.lerp_(mean.mean(0).view(c), factor)
                self.running_var.lerp_(unbiased.mean(0).view(c), factor)
                self.num_batches_tracked.add_(1)
        return out.view(n, c, h, w)


def convert_to_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(
                child.num_features, num_splits, eps=child.eps, momentum=child.momentum, affine=child.affine
            ).to(device=child.running_mean.device, dtype=child.running_mean.dtype)
            split.load_state_dict(child.state_dict())
            split.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, split)
        else:
            convert_to_split_bn(child, num_splits)
    return module

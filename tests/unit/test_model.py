import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leoclr_core.nn.model import (
    BACKBONE_REGISTRY,
    KeyQueue,
    SplitBatchNorm2d,
    build_backbone,
    build_encoder,
    convert_to_split_bn,
    momentum_at,
    update_momentum,
)
from leoclr_core.spec.models import BACKBONES, ModelSpec


def test_registry_names_exactly_the_spec_backbones():
    assert tuple(BACKBONE_REGISTRY) == BACKBONES


@pytest.mark.parametrize(
    "name,stem,size,dim",
    [("tiny", True, 32, 256), ("resnet18", True, 32, 512), ("resnet18", False, 64, 512), ("resnet50", True, 32, 2048)],
)
def test_backbones_map_images_to_features(name, stem, size, dim):
    net, feat_dim = build_backbone(ModelSpec(backbone=name, cifar_stem=stem))
    assert feat_dim == dim
    assert net(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_cifar_stem_keeps_resolution():
    net, _ = build_backbone(ModelSpec(backbone="resnet18", cifar_stem=True))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)


def test_encoder_outputs_unit_vectors_and_backbone_features():
    enc = build_encoder(ModelSpec(backbone="tiny", width=8, proj_hidden_dim=32, proj_dim=16))
    x = torch.randn(4, 3, 32, 32)
    z = enc(x)
    assert z.shape == (4, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert enc.features(x).shape == (4, 64)


def test_queue_is_fifo_element_by_element_with_wraparound():
    q = KeyQueue(size=5, dim=2)
    first = torch.arange(6, dtype=torch.float32).view(3, 2)
    q.enqueue(first)
    assert torch.equal(q.keys[:3], first) and q.ptr.item() == 3
    second = torch.arange(100, 106, dtype=torch.float32).view(3, 2)
    q.enqueue(second)
    # Positions 3, 4 then wrap to 0: the oldest key (row 0 of `first`) is overwritten first.
    assert torch.equal(q.keys[3], second[0]) and torch.equal(q.keys[4], second[1])
    assert torch.equal(q.keys[0], second[2]) and torch.equal(q.keys[1:3], first[1:])
    assert q.ptr.item() == 1


def test_queue_keeps_the_newest_when_a_batch_exceeds_it_and_zero_size_is_a_no_op():
    q = KeyQueue(size=3, dim=1)
    q.enqueue(torch.arange(7, dtype=torch.float32).view(7, 1))
    assert sorted(q.keys.view(-1).tolist()) == [4.0, 5.0, 6.0]
    empty = KeyQueue(size=0, dim=4)
    empty.enqueue(torch.randn(2, 4))
    assert empty.keys.shape == (0, 4)
    with pytest.raises(ValueError):
        KeyQueue(size=-1, dim=4)


def test_queue_state_travels_in_state_dict():
    q = KeyQueue(size=4, dim=3)
    q.enqueue(torch.ones(3, 3))
    other = KeyQueue(size=4, dim=3)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.keys, q.keys) and other.ptr.item() == 3


def test_update_momentum_is_an_ema_of_parameters_only():
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
        online.running_mean.fill_(5.0)
    update_momentum(online, target, 0.9)
    assert torch.allclose(target.weight, torch.full((3,), 0.1))
    assert torch.equal(target.running_mean, torch.zeros(3))  # buffers stay the target's own


def test_cosine_momentum_goes_from_base_to_one():
    assert momentum_at(0.99, 0, 100, "cosine") == pytest.approx(0.99)
    assert momentum_at(0.99, 50, 100, "cosine") == pytest.approx(0.995)
    assert momentum_at(0.99, 100, 100, "cosine") == pytest.approx(1.0)
    assert momentum_at(0.99, 70, 100, "constant") == 0.99


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_normalises_each_sub_batch_on_its_own(channels_last):
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(4, num_splits=2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(8, 4, 3, 3) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = bn.train()(x)
    for s in range(2):
        sub = x[4 * s : 4 * (s + 1)]  # sub-batches are contiguous chunks of the batch
        expected = F.batch_norm(sub, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        assert torch.allclose(out[4 * s : 4 * (s + 1)], expected, atol=1e-5)
    full = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    assert not torch.allclose(out, full, atol=1e-3)
    # running statistics: the mean of what each sub-batch's BatchNorm2d update would give
    expected_mean = 0.1 * torch.stack([x[4 * s : 4 * (s + 1)].mean((0, 2, 3)) for s in range(2)]).mean(0)
    expected_var = 0.9 + 0.1 * torch.stack([x[4 * s : 4 * (s + 1)].var((0, 2, 3)) for s in range(2)]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-4)
    # gradients flow (the module is also usable in a trained encoder)
    x.requires_grad_()
    bn(x).sum().backward()
    assert x.grad is not None and bn.weight.grad is not None
    with pytest.raises(ValueError, match="not divisible"):
        bn(torch.randn(3, 4, 2, 2))


def test_split_bn_keeps_bfloat16_activations():
    bn = SplitBatchNorm2d(2, num_splits=2).train()
    out = bn(torch.randn(4, 2, 3, 3).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_convert_to_split_bn_replaces_every_batchnorm_and_keeps_state():
    enc = build_encoder(ModelSpec(backbone="resnet18"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    convert_to_split_bn(enc, 4)
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 4 for m in bns)
    after = enc.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

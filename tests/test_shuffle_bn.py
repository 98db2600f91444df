"""Shuffle BN on one device: the permutation is undone exactly, and split BN normalises per sub-batch."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import MoCo, build_encoder
from model.split_bn import SplitBatchNorm2d, convert_to_split_bn


def test_split_shuffle_then_unshuffle_is_identity():
    moco = MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=32, shuffle="split", bn_splits=4)
    x = torch.randn(16, 3, 8, 8)
    shuffled, idx_unshuffle = moco._batch_shuffle_split(x)
    assert not torch.equal(shuffled, x)
    assert torch.equal(shuffled[idx_unshuffle], x)


def test_keys_come_back_in_input_order():
    """With BN frozen (eval), shuffling cannot change a key, so keys must equal a direct forward pass."""
    moco = MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=32, shuffle="split", bn_splits=4)
    moco.encoder_k.eval()
    x = torch.randn(16, 3, 8, 8)
    direct = F.normalize(moco.encoder_k(x), dim=1)
    torch.testing.assert_close(moco._compute_keys(x), direct, rtol=1e-5, atol=1e-6)


def reference_split_bn(x, weight, bias, splits, eps):
    """float64 BN of each contiguous block of the batch on its own: what `splits` devices compute."""
    outs = []
    for sub in x.double().chunk(splits):
        mean, var = sub.mean(dim=(0, 2, 3), keepdim=True), sub.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        outs.append(
            (sub - mean) / torch.sqrt(var + eps) * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
        )
    return torch.cat(outs)


@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_matches_a_float64_per_sub_batch_reference(splits, channels_last):
    """Forward, input and parameter gradients, and running statistics against separately normalised blocks."""
    torch.manual_seed(0)
    n, c = 16, 3
    bn = SplitBatchNorm2d(c, splits, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(n, c, 5, 5) * torch.arange(1.0, n + 1).view(n, 1, 1, 1)  # sub-batches differ in scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(n, c, 5, 5)
    out = bn(x)
    out.backward(grad)

    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = bn.weight.detach().double().requires_grad_(True), bn.bias.detach().double().requires_grad_(True)
    expected = reference_split_bn(x64, w64, b64, splits, bn.eps)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    blocks = x.detach().double().chunk(splits)
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in blocks]).mean(0)
    variances = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in blocks]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), 0.9 * start_mean.double() + 0.1 * means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        bn.running_var.double(), 0.9 * start_var.double() + 0.1 * variances, rtol=1e-5, atol=1e-6
    )
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert x.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_split_bn_without_grad_is_the_same_as_with_it():
    """The key encoder runs under no_grad, which skips the autograd Function: same output, same running stats."""
    torch.manual_seed(0)
    with_grad, without = SplitBatchNorm2d(4, 8), SplitBatchNorm2d(4, 8)
    x = torch.randn(16, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    expected = with_grad(x.requires_grad_(True))
    with torch.no_grad():
        out = without(x)
    assert torch.equal(out, expected.detach()) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(without.running_mean, with_grad.running_mean)
    assert torch.equal(without.running_var, with_grad.running_var)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_bn_in_half_precision_keeps_fp32_statistics(dtype):
    """Half-precision activations (autocast) with fp32 parameters: outputs within the dtype's rounding."""
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(4, 8)
    x = (torch.randn(16, 4, 3, 3) * 3 + 1).contiguous(memory_format=torch.channels_last).to(dtype)
    out = bn(x.requires_grad_(True))
    out.float().sum().backward()
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        out.double(), reference_split_bn(x.detach(), bn.weight, bn.bias, 8, bn.eps), rtol=2e-2, atol=2e-2
    )
    assert x.grad.dtype == dtype and bn.running_mean.dtype == torch.float32


def test_split_bn_differs_from_whole_batch_bn_and_keeps_state_dict_keys():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    keys = set(net.state_dict())
    x = torch.randn(8, 3, 6, 6) * torch.arange(1.0, 9).view(8, 1, 1, 1)
    whole = net(x)
    convert_to_split_bn(net, 2)
    assert isinstance(net[1], SplitBatchNorm2d) and set(net.state_dict()) == keys
    assert not torch.allclose(net(x), whole, atol=1e-3)
    net.eval()  # in eval mode the running statistics are used, exactly as plain BatchNorm2d
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(net[1].state_dict())
    plain.eval()
    features = torch.randn(8, 4, 6, 6)
    torch.testing.assert_close(net[1](features), plain(features))

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


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_uses_per_sub_batch_statistics(channels_last):
    torch.manual_seed(0)
    splits, n, c = 4, 16, 3
    bn = SplitBatchNorm2d(c, splits, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(n, c, 5, 5) * torch.arange(1.0, n + 1).view(n, 1, 1, 1)  # sub-batches differ in scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = bn(x)

    expected = torch.empty_like(x)
    means, variances = [], []
    for b in range(splits):  # sample i sits in sub-batch i % splits, as on GPU i % splits
        sub = x[b::splits]
        mean, var = sub.mean(dim=(0, 2, 3)), sub.var(dim=(0, 2, 3), unbiased=False)
        normed = (sub - mean.view(1, c, 1, 1)) / torch.sqrt(var.view(1, c, 1, 1) + bn.eps)
        expected[b::splits] = normed * bn.weight.view(1, c, 1, 1) + bn.bias.view(1, c, 1, 1)
        means.append(mean)
        variances.append(sub.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, 0.1 * torch.stack(means).mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * torch.stack(variances).mean(0))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


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

"""One MoCo step checked against an independent, literal implementation of the paper's Algorithm 1."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from model import MoCo, build_encoder
from model.infonce import infonce_loss


def algorithm1(f_q, f_k, queue, batches, m, t, lr):
    """Algorithm 1 of He et al. (2020), line by line: plain loops, a FIFO list for the queue."""
    queue = [col for col in queue.T]  # oldest first
    losses = []
    for x_q, x_k in batches:
        q = F.normalize(f_q(x_q), dim=1)
        k = F.normalize(f_k(x_k), dim=1).detach()
        l_pos = torch.stack([q[i] @ k[i] for i in range(len(q))]).view(-1, 1)
        l_neg = q @ torch.stack(queue, dim=1)
        logits = torch.cat([l_pos, l_neg], dim=1)
        loss = F.cross_entropy(logits / t, torch.zeros(len(q), dtype=torch.long))
        f_q.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in f_q.parameters():
                p -= lr * p.grad
            for p_k, p_q in zip(f_k.parameters(), f_q.parameters()):
                p_k.copy_(m * p_k + (1 - m) * p_q)
        queue = queue[len(k) :] + [col for col in k]  # enqueue the newest keys, dequeue the oldest
        losses.append(loss.item())
    return losses, f_k, torch.stack(queue, dim=1)


@pytest.mark.parametrize("mlp, fused_loss", [(False, False), (True, False), (True, True)])
def test_moco_matches_algorithm1(mlp, fused_loss):
    torch.manual_seed(0)
    batch, K, m, t, lr = 8, 32, 0.9, 0.2, 0.5
    moco = MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=K, m=m, T=t, mlp=mlp, shuffle="none")
    f_q, f_k = copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k)
    queue0 = moco.queue.clone()
    batches = [(torch.randn(batch, 3, 8, 8), torch.randn(batch, 3, 8, 8)) for _ in range(6)]

    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=lr)
    losses = []
    for x_q, x_k in batches:
        if fused_loss:
            loss = moco(x_q, x_k, fused_loss=True)
        else:
            loss = F.cross_entropy(*moco(x_q, x_k))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    moco._momentum_update_key_encoder()  # Algorithm 1 updates f_k after the step; MoCo at the next forward

    ref_losses, ref_k, ref_queue = algorithm1(f_q, f_k, queue0, batches, m, t, lr)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for (name, p), p_ref in zip(moco.encoder_k.named_parameters(), ref_k.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=name)
    ptr = int(moco.queue_ptr)
    assert ptr == (6 * batch) % K
    oldest_first = torch.roll(moco.queue, -ptr, dims=1)
    torch.testing.assert_close(oldest_first, ref_queue, rtol=1e-4, atol=1e-5)


def test_fused_infonce_equals_cross_entropy_over_concatenated_logits():
    """Value and gradient, in float64, at the paper's temperature and a queue wider than the batch."""
    torch.manual_seed(0)
    n, c, K, t = 16, 32, 4096, 0.2
    q = F.normalize(torch.randn(n, c, dtype=torch.float64), dim=1).requires_grad_()
    k = F.normalize(torch.randn(n, c, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(c, K, dtype=torch.float64), dim=0)
    reference = F.cross_entropy(
        torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / t, torch.zeros(n, dtype=torch.long)
    )
    (grad_reference,) = torch.autograd.grad(reference, q)
    fused = infonce_loss(q, k, queue, t)
    (grad_fused,) = torch.autograd.grad(fused, q)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-10, atol=1e-14)


def test_fused_infonce_gradient_survives_the_queue_update():
    """The enqueue overwrites the queue before the backward runs: the fused loss holds no reference to it, so its
    gradient is the one of the queue it saw (the official code needs a copy of the queue for that)."""
    torch.manual_seed(0)
    q = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    k, queue = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    (expected,) = torch.autograd.grad(infonce_loss(q, k, queue.clone(), 0.2), q)
    loss = infonce_loss(q, k, queue, 0.2)
    queue.normal_()  # the queue update, in place
    (grad,) = torch.autograd.grad(loss, q)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


def test_logits_are_fp32_under_bf16_autocast():
    moco = MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=32, shuffle="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = moco(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))
    assert logits.dtype == torch.float32 and moco.queue.dtype == torch.float32


def test_momentum_update_leaves_key_bn_buffers_alone():
    moco = MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=32, m=0.5, shuffle="none")
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
        moco.encoder_q.bn1.running_mean.fill_(7.0)
    before = {n: p.clone() for n, p in moco.encoder_k.named_parameters()}
    moco._momentum_update_key_encoder()
    for n, p in moco.encoder_k.named_parameters():
        torch.testing.assert_close(p, before[n] + 0.5)  # halfway to encoder_q, which is 1 ahead
    assert torch.all(moco.encoder_k.bn1.running_mean == 0)


def test_queue_pointer_survives_state_dict_round_trip():
    make = functools.partial(MoCo, functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=32, shuffle="none")
    moco = make()
    moco(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))
    restored = make()
    restored.load_state_dict(moco.state_dict())
    assert int(restored.queue_ptr) == 8
    torch.testing.assert_close(restored.queue, moco.queue)

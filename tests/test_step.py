"""The training step under mixed precision, the optimizers and the lr schedule."""

import functools
import importlib.util
import math

import pytest
import torch

from benchmarks.core.diagnostics import HostReads
from engine.config import OptimConfig
from engine.optim import LARS, build_optimizer, learning_rate
from engine.step import MocoStep, resolve_precision
from model import MoCo, build_encoder


def make_moco():
    torch.manual_seed(0)
    return MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=64, shuffle="split", bn_splits=2)


def make_step(moco, precision, fused_loss):
    return MocoStep(
        moco, build_optimizer(OptimConfig(lr=0.1), moco.parameters()), precision, torch.device("cpu"), fused_loss
    )


@pytest.mark.parametrize("fused_loss", [False, True])
def test_fp16_step_skips_a_nonfinite_loss_and_goes_on(fused_loss):
    moco = make_moco()
    step = make_step(moco, "fp16", fused_loss)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # no overflow in this model's fp16 gradients
    x = torch.randn(8, 3, 8, 8)
    step(x, x)
    scale, skipped = step.scaler.get_scale(), int(step.counters.skipped)
    assert skipped == 0
    before = {n: p.clone() for n, p in moco.encoder_q.named_parameters()}
    loss = step(torch.full_like(x, float("nan")), x)
    assert not torch.isfinite(loss) and int(step.counters.nonfinite) == 1
    assert int(step.counters.skipped) == skipped + 1 and int(step.counters.first_nonfinite) == 1  # the second step
    assert step.scaler.get_scale() == scale / 2
    for n, p in moco.encoder_q.named_parameters():
        assert torch.equal(p, before[n]), n  # the update was skipped
    assert torch.isfinite(step(x, x))  # and training goes on
    assert int(step.counters.nonfinite) == 1 and int(step.counters.skipped) == skipped + 1
    assert int(step.counters.steps) == 3


def test_fp16_counts_the_steps_the_scaler_skipped_not_nonfinite_losses():
    """A loss scale too large for fp16 gradients: the loss is finite, the gradients overflow, the step is skipped."""
    moco = make_moco()
    step = make_step(moco, "fp16", fused_loss=True)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    x = torch.randn(8, 3, 8, 8)
    assert torch.isfinite(step(x, x))
    assert (int(step.counters.skipped), int(step.counters.nonfinite)) == (1, 0)
    assert step.scaler.get_scale() == 2.0**39


def test_bf16_step_tracks_the_fp32_step():
    torch.manual_seed(0)
    x_q, x_k = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    losses = {}
    for precision in ("fp32", "bf16"):
        moco = make_moco()
        step = make_step(moco, precision, fused_loss=False)
        torch.manual_seed(1)  # same shuffle-BN permutations
        losses[precision] = [float(step(x_q, x_k)) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2)  # same weights, bf16 forward


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fused_loss", [False, True])
def test_step_reads_nothing_back_on_the_host(precision, fused_loss):
    """Forward, loss, backward, GradScaler, fused SGD, momentum and queue updates dispatch no op that would
    make the host wait for a GPU; the official queue-pointer read (`int(queue_ptr)`) is caught as one."""
    moco = make_moco().to(memory_format=torch.channels_last)
    step = make_step(moco, precision, fused_loss)
    x = torch.randn(8, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    step(x, x)
    with HostReads() as reads:
        step(x, x)
        step(x, x)
    assert reads.found == []
    with HostReads() as reads:
        int(moco.queue_ptr)
    assert reads.found == ["_local_scalar_dense"]


def test_precision_auto():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_lars_matches_its_definition():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.nn.Parameter(torch.randn(4))
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad.clone(), bias.grad.clone()
    LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001).step()
    update = gw + 0.1 * w0
    trust = 0.001 * w0.norm() / update.norm()
    torch.testing.assert_close(weight.detach(), w0 - 0.5 * trust * update)
    torch.testing.assert_close(bias.detach(), b0 - 0.5 * gb)  # biases: no decay, no trust ratio


def test_apex_optimizer_needs_apex():
    """apex is on no registry we reach: asking for it without it says so clearly; with it, it is apex's FusedSGD."""
    from engine.config import ConfigError

    params = [torch.nn.Parameter(torch.zeros(1))]
    if importlib.util.find_spec("apex") is None:
        with pytest.raises(ConfigError, match="apex"):
            build_optimizer(OptimConfig(optimizer="apex-sgd"), params)
    else:
        from apex.optimizers import FusedSGD

        assert isinstance(build_optimizer(OptimConfig(optimizer="apex-sgd"), params), FusedSGD)


def test_learning_rate_schedules():
    cos = OptimConfig(lr=0.4, schedule="cos", warmup_epochs=2)
    assert learning_rate(cos, 1.0, 10) == pytest.approx(0.2)
    assert learning_rate(cos, 2.0, 10) == pytest.approx(0.4)
    assert learning_rate(cos, 6.0, 10) == pytest.approx(0.2)
    assert learning_rate(cos, 10.0, 10) == pytest.approx(0.0, abs=1e-12)
    step = OptimConfig(lr=0.03, schedule="step", lr_steps=(120, 160))
    assert [learning_rate(step, e, 200) for e in (0, 119.9, 120, 170)] == pytest.approx([0.03, 0.03, 0.003, 0.0003])

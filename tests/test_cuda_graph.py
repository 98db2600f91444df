"""The CUDA-graphed step trains exactly as the eager one; its learning rate still follows the schedule."""

import functools

import pytest
import torch
from conftest import requires_cuda

from engine.cli import parse_config, validate
from engine.config import ConfigError, OptimConfig
from engine.cuda_graph import GraphedStep
from engine.optim import build_optimizer, set_learning_rate
from engine.step import MocoStep
from model import MoCo, build_encoder


def make_step(device, precision="fp32", optimizer="sgd"):
    torch.manual_seed(0)
    moco = MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=64, shuffle="none").to(
        device, memory_format=torch.channels_last
    )
    opt = build_optimizer(OptimConfig(optimizer=optimizer, lr=0.1), moco.parameters())
    return moco, MocoStep(moco, opt, precision, torch.device(device), fused_loss=True)


def test_tensor_learning_rate_is_filled_in_place():
    lr = torch.tensor(0.5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    set_learning_rate(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == 0.25


@pytest.mark.parametrize(
    "flags, world_size, device, message",
    [
        ([], 1, "cpu", "needs a CUDA device"),
        (["--precision", "fp16"], 1, "cuda", "bf16 or fp32"),
        (["--optimizer", "lars"], 1, "cuda", "optimizer sgd with --fused-sgd"),
        (["--no-fused-sgd"], 1, "cuda", "optimizer sgd with --fused-sgd"),
        ([], 2, "cuda", "single-process"),
        (["--compile"], 1, "cuda", "choose one"),
    ],
)
def test_refuses_what_it_cannot_capture_before_any_work(flags, world_size, device, message):
    """validate() knows every CUDA-graph limit: no GPU is needed to refuse, and no data is read first."""
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(["--cuda-graphs", "--batch-size", "64", *flags]), world_size, device)


@requires_cuda
def test_graphed_steps_match_eager_steps():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    gen = torch.Generator().manual_seed(1)
    batches = [
        tuple(torch.randn(16, 3, 16, 16, generator=gen).cuda().to(memory_format=torch.channels_last) for _ in range(2))
        for _ in range(5)
    ]
    lrs = [0.1, 0.08, 0.05, 0.02, 0.0]
    runs = {}
    for graphed in (False, True):
        moco, step = make_step("cuda")
        if graphed:
            step = GraphedStep(step)
        losses = []
        for lr, (im_q, im_k) in zip(lrs, batches):
            set_learning_rate(step.optimizer, lr)
            losses.append(step(im_q, im_k))
        runs[graphed] = (torch.stack(losses).cpu(), {k: v.clone() for k, v in moco.state_dict().items()})
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-4, atol=1e-5, msg=name)

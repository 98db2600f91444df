"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import importlib.util
import math

import torch

from engine.config import ConfigError, OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in the official MoCo v3: layer-wise trust ratio on weights, plain SGD with
    momentum on biases and BN parameters. Trust ratios use torch.where, so a step never syncs with the host."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * p_norm / u_norm
                    update = update.mul(torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio)))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def _sgd(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    kernel = {"fused": True} if cfg.fused_sgd else {"foreach": True}
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, **kernel)


def _lars(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    return LARS(params, lr=cfg.lr, weight_decay=cfg.wd, momentum=cfg.momentum)


def _apex_sgd(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if importlib.util.find_spec("apex") is None:
        raise ConfigError("--optimizer apex-sgd needs NVIDIA apex, which is not importable; use sgd (fused)")
    from apex.optimizers import FusedSGD

    return FusedSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)


# --optimizer name -> builder(cfg, params)
OPTIMIZERS = {"sgd": _sgd, "lars": _lars, "apex-sgd": _apex_sgd}
SCHEDULES = ("cos", "step")


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {cfg.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.optimizer](cfg, [p for p in params if p.requires_grad])


def check_same_optimizer(saved: str, name: str) -> None:
    """A checkpoint's optimizer state loads only into the optimizer that wrote it: another one's (an SGD state
    resumed with LARS) would load without complaint and fail at the first step. Official checkpoints are SGD's."""
    if saved != name:
        raise ConfigError(
            f"the checkpoint's optimizer state is --optimizer {saved}'s, not {name}'s; resume with --optimizer {saved}"
        )


def lay_out_state_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (SGD's momentum buffer, LARS's mu) its parameter's strides. A loaded
    state keeps the layout it was saved in (an official or --no-channels-last checkpoint's NCHW), and CUDA's fused
    SGD refuses buffers whose strides differ from their parameters'. A copy once per resume, never per step."""
    for p, state in optimizer.state.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                state[name] = torch.empty_like(p).copy_(value)


def learning_rate(cfg: OptimConfig, epoch_progress: float, epochs: int) -> float:
    """The lr at a fractional epoch: linear warm-up, then cosine to 0 or the paper's x0.1 steps."""
    if epoch_progress < cfg.warmup_epochs:
        return cfg.lr * epoch_progress / cfg.warmup_epochs
    if cfg.schedule == "cos":
        span = max(epochs - cfg.warmup_epochs, 1e-8)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch_progress - cfg.warmup_epochs) / span))
    return cfg.lr * 0.1 ** sum(epoch_progress >= milestone for milestone in cfg.lr_steps)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """A device-tensor lr (a CUDA-graphed step reads it) is filled in place, without a sync."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr

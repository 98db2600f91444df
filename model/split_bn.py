"""Split BatchNorm: one device computes BN statistics as N devices would.

MoCo's Shuffle BN only matters because each GPU normalises its own sub-batch. On one device,
`SplitBatchNorm2d` normalises `num_splits` contiguous blocks of the batch separately (samples
[i*N/s, (i+1)*N/s) form sub-batch i), which is exactly what N GPUs with batch/N samples each compute: the
query blocks are the "GPUs'" own samples and the key shuffle sends each key to a random block.

A batch block is a contiguous slice in NCHW and in channels_last alike, so each block is normalised where
it lies: the forward writes every block's output into its slice of one output tensor (`native_batch_norm`'s
out= kernel), with no reshape, no layout conversion and no concatenation. The backward writes each block's
input gradient into its slice too; torch's BN backward has no in-place out= kernel (its `.out` variant
computes and then copies), so that write is the one copy left, and it moves the gradient once.
Under torch.compile the same blocks are written as split + batch_norm + cat, which inductor fuses.
Parameter and buffer names are BatchNorm2d's, so checkpoints load into plain torchvision models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """BN's saved mean/invstd are in the accumulation type: fp32 for half-precision inputs."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def block_batch_norm(x, weight, bias, splits: int, eps: float):
    """Each of `splits` contiguous batch blocks normalised with its own statistics, written into its slice of one
    output; returns it and the blocks' (splits x C) means and inverse standard deviations."""
    out = torch.empty_like(x)
    save_mean = torch.empty(splits, x.shape[1], dtype=_stats_dtype(x), device=x.device)
    save_invstd = torch.empty_like(save_mean)
    for xb, ob, mean, invstd in zip(x.chunk(splits), out.chunk(splits), save_mean.unbind(), save_invstd.unbind()):
        torch.native_batch_norm(xb, weight, bias, None, None, True, 0.0, eps, out=(ob, mean, invstd))
    return out, save_mean, save_invstd


class _BlockBatchNorm(torch.autograd.Function):
    """`block_batch_norm` with its backward. (Group norm with one group per channel over a
    (splits, C, rows, 1) view computes the same in one call without copies, but in the ResNet-50 step its CPU
    kernel took 136 ms per step where per-block BN took 70: measured with torch.profiler.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, splits, eps):
        out, save_mean, save_invstd = block_batch_norm(x, weight, bias, splits, eps)
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.splits, ctx.eps = splits, eps
        ctx.mark_non_differentiable(save_mean, save_invstd)
        return out, save_mean, save_invstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            weight is not None and ctx.needs_input_grad[2],
        ]
        grad_in = torch.empty_like(x) if mask[0] else None
        grad_w = grad_b = None
        grad_out = grad_out.contiguous(memory_format=_layout_of(x))  # autograd hands over x's layout already
        blocks = zip(
            x.chunk(ctx.splits),
            grad_out.chunk(ctx.splits),
            save_mean.unbind(),
            save_invstd.unbind(),
            grad_in.chunk(ctx.splits) if mask[0] else [None] * ctx.splits,
        )
        for xb, gb, mean, invstd, grad_block in blocks:
            gi, gw, gbias = _BN_BACKWARD(gb, xb, weight, None, None, mean, invstd, True, ctx.eps, mask)
            if mask[0]:
                grad_block.copy_(gi)  # no in-place BN backward kernel exists (its .out variant copies too)
            if mask[1]:
                grad_w = gw if grad_w is None else grad_w.add_(gw)
            if mask[2]:
                grad_b = gbias if grad_b is None else grad_b.add_(gbias)
        return grad_in, grad_w, grad_b, None, None


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class SplitBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        s = self.num_splits
        if x.shape[0] % s:
            raise ValueError(f"split BN: batch of {x.shape[0]} does not split into {s} sub-batches")
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        if not x.is_contiguous(memory_format=_layout_of(x)):
            x = x.contiguous()  # a strided view (not what a conv hands over): blocks must be dense slices
        if torch.is_grad_enabled():
            out, mean, invstd = _BlockBatchNorm.apply(x, self.weight, self.bias, s, self.eps)
        else:  # the key encoder: no graph to record
            out, mean, invstd = block_batch_norm(x, self.weight, self.bias, s, self.eps)
        if self.track_running_stats:
            with torch.no_grad():  # what N devices' running statistics average to (the unbiased variance)
                rows = x.numel() // (s * x.shape[1])  # per block and channel
                var = (invstd.pow(-2) - self.eps).mean(0) * (rows / max(rows - 1, 1))
                self.running_mean.lerp_(mean.mean(0), self.momentum)
                self.running_var.lerp_(var, self.momentum)
                self.num_batches_tracked.add_(1)
        return out

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same blocks as split + batch_norm + cat, which inductor fuses into one output without copies."""
        s = self.num_splits
        mean = self.running_mean.repeat(s, 1) if self.track_running_stats else None
        var = self.running_var.repeat(s, 1) if self.track_running_stats else None
        out = torch.cat(
            [
                F.batch_norm(
                    xb,
                    None if mean is None else mean[i],
                    None if var is None else var[i],
                    self.weight,
                    self.bias,
                    True,
                    self.momentum,
                    self.eps,
                )
                for i, xb in enumerate(x.chunk(s))
            ]
        )
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(mean.mean(0))
                self.running_var.copy_(var.mean(0))
                self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_to_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(
                child.num_features,
                num_splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_to_split_bn(child, num_splits)
    return module

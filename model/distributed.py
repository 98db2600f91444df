"""The collectives MoCo needs, written so that a single process needs no process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` stacked along dim 0 in rank order, in `x`'s own memory layout. No gradient flows back
    (keys need none). Dim 0 is outermost in NCHW and channels_last alike, so rank blocks concatenate as bytes:
    a channels_last key batch is gathered as it lies, with no conversion to NCHW and back."""
    if world_size() == 1:
        return x
    layout = (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=layout)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, x.contiguous(memory_format=layout))  # a no-op but for a strided view
    return out

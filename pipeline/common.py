"""What every loader shares: sharding arithmetic, the one seed derivation, and the hand-off to the MoCo step.

The loader contract for resumption: `set_epoch(epoch, start_step=0)` makes the next iteration yield that epoch's
batches from `start_step` on, without reading or decoding the samples before it; `state_dict()` is what the
loader needs beyond (epoch, step) to continue bit-exactly (DALI's random-number states; nothing for the others),
taken after the last batch the consumer received, and `load_state_dict(state)` hands it to the next iteration.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.errors import DataError


def derive_seed(seed: int, epoch: int, rank: int = -1, index: int = -1) -> int:
    """The one way a seed is derived in this project: a well-mixed 63-bit seed for (run seed, epoch, rank, index).

    rank -1 means "the same on every rank" (the epoch's shuffle, a sample's own augmentation); index -1 means
    "the whole epoch" (a rank's generator for the epoch). Distinct inputs give independent streams.
    """
    state = 0
    for word in (seed, epoch, rank + 1, index + 1):
        state = _splitmix64(state ^ (word & _MASK64))
    return state >> 1


_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele et al., 2014): every input bit affects every output bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Each rank gets `num_samples // world_size` disjoint samples; the last partial batch is dropped."""
    steps = (num_samples // world_size) // batch_size
    if steps == 0:
        raise DataError(
            f"dataset has {num_samples} images: too few for one batch of {batch_size} on each of {world_size} ranks"
        )
    return steps


def epoch_shard(num_samples: int, rank: int, world_size: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's disjoint, equal share of the epoch's permutation (the same permutation on every rank)."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    return order[: (num_samples // world_size) * world_size][rank::world_size]


def check_start_step(start_step: int, steps: int) -> int:
    if not 0 <= start_step < steps:
        raise ValueError(f"start step {start_step} is outside the epoch's {steps} steps")
    return start_step


def to_uint8_hwc(img) -> torch.Tensor:
    """The last op of a worker's transform: a PIL RGB image as an HWC uint8 tensor. A worker does no float work,
    and a collated batch is NHWC uint8: a quarter of fp32's bytes in shared memory, pinned memory and over the bus."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


class DeviceNormalize:
    """NHWC uint8 batches to normalised NCHW channels_last views in `dtype` on `device`, as timm's prefetcher
    does: one non-blocking uint8 copy (from pinned memory on a GPU), then one fused pass on the device,
    x * 1/(255 std) - mean/std (ToTensor + Normalize within float rounding). NHWC memory is NCHW channels_last,
    so the permute is a view."""

    def __init__(self, mean, std, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=self.device).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        out = torch.empty(x.shape, dtype=self.dtype, device=self.device, memory_format=torch.channels_last)
        return torch.addcmul(self.shift, x, self.scale, out=out)  # computed in fp32, rounded once on the write


def to_step_layout(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An NCHW batch on `device` in `dtype` and channels_last: the layout the MoCo step consumes."""
    x = x.to(device, non_blocking=True)
    return x.to(dtype=dtype, memory_format=torch.channels_last)


def default_workers() -> int:
    """Loader workers/threads per rank: every core but one, shared among this node's ranks (torchrun sets
    LOCAL_WORLD_SIZE), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))

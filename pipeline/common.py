"""What every loader shares: sharding arithmetic, per-epoch seeds, and the hand-off to the MoCo step."""

from __future__ import annotations

import os

import torch

from pipeline.errors import DataError


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Each rank gets `num_samples // world_size` disjoint samples; the last partial batch is dropped."""
    steps = (num_samples // world_size) // batch_size
    if steps == 0:
        raise DataError(
            f"dataset has {num_samples} images: too few for one batch of {batch_size} on each of {world_size} ranks"
        )
    return steps


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle, the same on every rank so their shards stay disjoint."""
    return (seed * 1_000_003 + epoch) % (2**63)


def epoch_shard(num_samples: int, rank: int, world_size: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's disjoint, equal share of the epoch's permutation (the same permutation on every rank)."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    return order[: (num_samples // world_size) * world_size][rank::world_size]


def to_step_layout(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An NCHW batch on `device` in `dtype` and channels_last: the layout the MoCo step consumes."""
    x = x.to(device, non_blocking=True)
    return x.to(dtype=dtype, memory_format=torch.channels_last)


def default_workers() -> int:
    """Loader workers/threads per rank: every core but one, shared among this node's ranks (torchrun sets
    LOCAL_WORLD_SIZE), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))

"""The torch loader taken apart: read/decode, augment (both views), collate and the host-to-device copy.

A loader run only shows the slowest piece. Here each piece of the torch loader runs alone, in this process on
one thread as a DataLoader worker runs it, on a sample of images, scaled to ms per batch. The workers run
the first three in parallel, so when the CPU is the limit the loader's wall time per batch is about their sum
over --workers.
"""

from __future__ import annotations

import math
import statistics

import torch

from benchmarks.core import host, timing, workload
from engine.config import TrainConfig
from engine.distributed import Runtime
from pipeline.augs import get_recipe
from pipeline.common import DeviceNormalize
from pipeline.datasets import resolve_dataset
from pipeline.torch_loader import view_transform

PIECES = ("read_decode", "augment", "collate", "h2d")


def measure(cfg: TrainConfig, runtime: Runtime, precision: str, sample: int) -> dict[str, float]:
    """ms per batch of each piece, on one core; the copy is timed on a full batch, median of 5."""
    dataset = resolve_dataset(cfg.data.data, "train", cfg.data.image_size)
    recipe = get_recipe(cfg.data.aug)
    transform = view_transform(recipe, cfg.data.image_size)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    indices = torch.randperm(len(dataset), generator=generator)[:sample].tolist()
    batch = workload.per_rank_batch(cfg, runtime)
    torch.manual_seed(cfg.run.seed)
    with host.torch_threads(1):  # as in a DataLoader worker
        with timing.timed() as read_decode:
            images = [dataset.load(i) for i in indices]
        with timing.timed() as augment:
            views = [(transform(img), transform(img)) for img in images]
        with timing.timed() as collate:
            im_q, im_k = (torch.stack([pair[v] for pair in views]) for v in (0, 1))
    per_batch = batch / len(indices)
    normalize = DeviceNormalize(recipe.mean, recipe.std, runtime.device, workload.input_dtype(precision))
    return {
        "read_decode": read_decode.ms * per_batch,
        "augment": augment.ms * per_batch,
        "collate": collate.ms * per_batch,
        "h2d": h2d_ms(im_q, im_k, batch, normalize),
    }


def h2d_ms(im_q: torch.Tensor, im_k: torch.Tensor, batch: int, normalize: DeviceNormalize) -> float:
    """Both views of a full uint8 batch, from pinned memory (on a GPU), normalised into the step's layout on the
    device."""
    device = normalize.device
    im_q, im_k = (x.repeat(math.ceil(batch / len(x)), 1, 1, 1)[:batch] for x in (im_q, im_k))
    if device.type == "cuda":
        im_q, im_k = im_q.pin_memory(), im_k.pin_memory()
    return statistics.median(
        timing.timed_window(device, lambda: (normalize(im_q), normalize(im_k)), 1).ms for _ in range(5)
    )

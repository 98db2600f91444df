"""Time pipeline.gpu_augment against kornia's equivalent augmentation on the same two-view batches.

Both sides get the same uint8 channels_last views, convert them to float once, apply the recipe's flip, colour
jitter, grayscale and Gaussian blur with per-sample random parameters, normalise, and return channels_last
batches: ours as `TwoViewAugment`, kornia as RandomHorizontalFlip -> ColorJitter -> RandomGrayscale ->
RandomGaussianBlur -> Normalize on the concatenated views. `--batch-size` is the images per view, `--repeats`
the calls timed per side (interleaved, after `--warmup` each).

    python -m benchmarks.studies.augment --device cpu --batch-size 64 --image-size 224 --aug v2 --repeats 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from benchmarks.__main__ import main
from benchmarks.core import timing
from benchmarks.core.record import Record, peak_memory
from engine.config import ConfigError, TrainConfig
from engine.distributed import Runtime
from pipeline.augs import AugRecipe, get_recipe
from pipeline.gpu_augment import BLUR_TRUNCATE, TwoViewAugment

SUITE = "augment"  # the name its results carry


def kornia_augment(recipe: AugRecipe, device: torch.device, dtype: torch.dtype):
    """kornia's per-sample flip, ColorJitter, RandomGrayscale, RandomGaussianBlur and Normalize (our kernel size)."""
    import kornia.augmentation as K

    radius = math.ceil(BLUR_TRUNCATE * recipe.blur_sigma[1])
    ops = torch.nn.Sequential(
        K.RandomHorizontalFlip(p=recipe.flip_prob),
        K.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue, p=recipe.jitter_prob),
        K.RandomGrayscale(p=recipe.grayscale_prob),
        K.RandomGaussianBlur((2 * radius + 1,) * 2, recipe.blur_sigma, p=recipe.blur_prob),
        K.Normalize(torch.tensor(recipe.mean), torch.tensor(recipe.std)),
    ).to(device)

    def augment(im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([im_q, im_k]).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        out = ops(both).to(dtype, memory_format=torch.channels_last)
        return out[: len(im_q)], out[len(im_q) :]

    return augment


def time_interleaved(
    sides: dict, im_q: torch.Tensor, im_k: torch.Tensor, repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """ms per call of each side, device work included; sides alternate so drifting load hits both alike."""
    for augment in sides.values():
        for _ in range(warmup):
            augment(im_q, im_k)
    ms: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, augment in sides.items():
            with timing.timed(im_q.device) as call:
                augment(im_q, im_k)
            ms[name].append(call.ms)
    return ms


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    try:
        import kornia  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the augment study compares against kornia, which is not installed: pip install kornia"
        ) from None
    device, recipe = runtime.device, get_recipe(cfg.data.aug)
    batch, size = cfg.optim.batch_size, cfg.data.image_size
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
    im_q, im_k = (
        torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device, generator=gen).contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(2)
    )
    sides = {"ours": TwoViewAugment(recipe, device=device), "kornia": kornia_augment(recipe, device, torch.float32)}
    records = []
    for name, samples in time_interleaved(sides, im_q, im_k, opts.repeats, opts.warmup).items():
        ms = statistics.median(samples)
        records.append(
            Record(
                name,
                2 * batch / (ms / 1e3),
                None,
                {"augment": ms},
                **peak_memory(device),
                stage_groups={"two views, one call": ["augment"]},
                notes=[
                    "ours: a random op order per sample, every op run on the whole batch with identity parameters "
                    "where skipped (no host sync); kornia: one op order per batch, each op run on the selected "
                    "samples only (boolean indexing, a host sync per op)"
                ],
                extra={"ms_per_call_each_repeat": [round(s, 1) for s in samples]},
            )
        )
    return records


if __name__ == "__main__":
    sys.exit(main(study=sys.modules[__name__]))

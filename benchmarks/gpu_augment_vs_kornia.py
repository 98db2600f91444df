"""Time pipeline.gpu_augment against kornia's equivalent augmentation on the same two-view batches.

Both sides get the same uint8 channels_last views, convert them to float once, apply the recipe's flip, colour
jitter, grayscale and Gaussian blur with per-sample random parameters, normalise, and return channels_last
batches: ours as `TwoViewAugment`, kornia as RandomHorizontalFlip -> ColorJitter -> RandomGrayscale ->
RandomGaussianBlur -> Normalize on the concatenated views. Prints milliseconds per call and images per second,
and writes them as JSON.

    python -m benchmarks.gpu_augment_vs_kornia [--device cpu] [--batch-size 64] [--image-size 224] [--aug v2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import host, report, timing
from pipeline.augs import AugRecipe, get_recipe
from pipeline.gpu_augment import BLUR_TRUNCATE, TwoViewAugment

RESULTS = Path(__file__).parent / "results"


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
        return out[: len(im_q)], out[len(im_q):]

    return augment


def time_interleaved(sides: dict, im_q: torch.Tensor, im_k: torch.Tensor, repeats: int,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each side, device work included; sides alternate so drifting load hits both alike."""
    for augment in sides.values():
        for _ in range(warmup):
            augment(im_q, im_k)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, augment in sides.items():
            timing.synchronize(im_q.device)
            start = time.perf_counter()
            augment(im_q, im_k)
            timing.synchronize(im_q.device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="images per view (default 64)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--aug", default="v2", choices=("v1", "v2"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    try:
        import kornia
    except ImportError:
        raise SystemExit("this comparison needs kornia (not a project dependency): pip install kornia") from None

    device, recipe = torch.device(args.device), get_recipe(args.aug)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    im_q, im_k = (torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)
                  .contiguous(memory_format=torch.channels_last) for _ in range(2))
    sides = {"ours": TwoViewAugment(recipe, device=device), "kornia": kornia_augment(recipe, device, torch.float32)}
    figures = {}
    for name, samples in time_interleaved(sides, im_q, im_k, args.repeats).items():
        seconds = statistics.median(samples)
        figures[name] = {"ms_per_call": seconds * 1e3, "images_per_s": 2 * args.batch_size / seconds,
                         "ms_per_call_each_repeat": [round(s * 1e3, 1) for s in samples]}
        print(f"{name:>7}: {seconds * 1e3:8.1f} ms per call of 2 x {args.batch_size} images, "
              f"{2 * args.batch_size / seconds:8.0f} images/s")
    speedup = figures["kornia"]["ms_per_call"] / figures["ours"]["ms_per_call"]
    print(f"ours is {speedup:.2f}x kornia's speed")
    result = {
        "benchmark": "gpu_augment_vs_kornia",
        "command": "python -m benchmarks.gpu_augment_vs_kornia " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": host.device_name(device),
        "versions": {**host.versions(), "kornia": kornia.__version__},
        "torch_threads": torch.get_num_threads(),
        "aug": args.aug, "batch_size_per_view": args.batch_size, "image_size": args.image_size,
        "repeats": args.repeats, "statistic": "median seconds per call",
        "figures": figures, "speedup_ours_over_kornia": speedup,
        "semantics": ("ours: a random op order per sample, every op run on the whole batch with identity "
                      "parameters where skipped (no host sync); kornia: one op order per batch, each op run on "
                      "the selected samples only (boolean indexing, a host sync per op)"),
    }
    out = args.out or RESULTS / f"gpu_augment_vs_kornia_{device.type}.json"
    report.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

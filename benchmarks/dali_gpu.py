"""Time the DALI loader alone, both decode strategies, on an ImageNet-like JPEG folder; write the figures as JSON.

Each strategy reads `--epochs` epochs after one warm-up epoch (nvJPEG and hardware-decoder start-up). The loader
builds a pipeline per epoch, so images/s is over whole epochs, builds included; `first_batch_s` is the mean wait
for an epoch's first batch. Host CPU is the process's user + system time over the same span (100% = one core);
GPU memory is the device's used memory above what it was before the loader, sampled after every batch.

    python -m benchmarks.dali_gpu [--data DIR] [--images 5000] [--batch-size 256] [--image-size 224] [--epochs 3]

Without `--data`, `--images` JPEGs are generated once under data/ (benchmarks.imagenet_like, ~10 ms each).
`--device cpu` runs DALI's CPU mode, a smoke test of this script on machines without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import host, report
from benchmarks.imagenet_like import generate
from pipeline import build_loader
from pipeline.dali_loader import DECODE_STRATEGIES

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[1] / "data"


def device_memory_used(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_strategy(data: Path, decode: str, args, device: torch.device) -> dict:
    """One warm-up epoch, then `args.epochs` timed ones, every batch waited for as a training step would."""
    baseline = device_memory_used(device)
    loader = build_loader("dali", str(data), batch_size=args.batch_size, image_size=args.image_size, device=device,
                          dtype=torch.bfloat16, decode=decode, num_workers=args.workers,
                          hw_decoder_load=args.hw_decoder_load)
    for _ in loader:
        synchronize(device)
    peak, first_batch = 0, []
    wall, cpu = time.perf_counter(), host.cpu_seconds()
    for _ in range(args.epochs):
        epoch_start = time.perf_counter()
        for step, _ in enumerate(loader):
            synchronize(device)
            if step == 0:
                first_batch.append(time.perf_counter() - epoch_start)
            peak = max(peak, device_memory_used(device) - baseline)
    wall, cpu = time.perf_counter() - wall, host.cpu_seconds() - cpu
    images = args.epochs * len(loader) * args.batch_size
    return {
        "images_per_s": images / wall, "views_per_s": 2 * images / wall,
        "host_cpu_percent": 100 * cpu / wall, "host_cpu_ms_per_image": 1e3 * cpu / images,
        "gpu_memory_mib": peak / 2**20, "first_batch_s": statistics.mean(first_batch),
        "steps_per_epoch": len(loader), "timed_images": images, "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder root (default: generated under data/)")
    parser.add_argument("--images", type=int, default=5000, help="images to generate without --data")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--workers", type=int, default=None, help="DALI CPU threads (default: the loader's)")
    parser.add_argument("--hw-decoder-load", type=float, default=0.65)
    parser.add_argument("--decode", nargs="+", default=list(DECODE_STRATEGIES), choices=DECODE_STRATEGIES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.init()
    data = args.data or DATA / f"imagenet_like_{args.images}"
    if args.data is None and not data.is_dir():
        generate(data, args.images)
    figures = {}
    for decode in args.decode:
        figures[decode] = time_strategy(data, decode, args, device)
        f = figures[decode]
        print(f"{decode:>5}: {f['images_per_s']:8.0f} images/s ({f['views_per_s']:.0f} views/s), "
              f"host CPU {f['host_cpu_percent']:.0f}% ({f['host_cpu_ms_per_image']:.2f} ms/image), "
              f"GPU memory {f['gpu_memory_mib']:.0f} MiB, first batch {f['first_batch_s']:.2f} s")
    result = {
        "benchmark": "dali_gpu",
        "command": "python -m benchmarks.dali_gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": host.device_name(device),
        "versions": host.versions(),
        "data": str(data), "batch_size": args.batch_size, "image_size": args.image_size, "dtype": "bfloat16",
        "timed_epochs": args.epochs, "workers": args.workers, "hw_decoder_load": args.hw_decoder_load,
        "statistic": "whole timed epochs (per-epoch pipeline builds included)", "figures": figures,
    }
    out = args.out or RESULTS / f"dali_gpu_{device.type}.json"
    report.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

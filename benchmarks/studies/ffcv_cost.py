"""Host CPU-seconds per image: the FFCV loader's CPU half against the reference torch loader, same two views.

    python -m benchmarks.studies.ffcv_cost [--images 2000] [--repeats 3] [--thread-counts 1 2] [--json FILE]

An ImageNet-like JPEG set (`benchmarks.tools.imagenet_like`, or --data) is read at 224 px, batch 64, two views
per image; each side's cost is this process's CPU time, threads included, over an epoch, divided by its images
(median over --repeats epochs, after one warm-up epoch that also compiles FFCV's pipeline):

  torch v2         the reference loader's host work: PIL decode, RandomResizedCrop, aug+ (jitter, grayscale,
                   PIL blur), flip, uint8 HWC tensors, collate (normalisation runs on the device); in this
                   process with one torch thread, as in a DataLoader worker (torch_loader's DataLoader, without
                   its device copy)
  torch crop+flip  the same with jitter, grayscale and blur off: the like-for-like figure for FFCV
  ffcv ...         FFCV's half of the ffcv loader (`make_ffcv_loader`): JPEG decode and RandomResizedCrop,
                   decoding once for both views (decode once, the default) or once per view (decode twice),
                   uint8 views into host memory; flip and the rest of aug+ run on the GPU
                   (pipeline.gpu_augment) and are not host work. Measured on .betons at 256 px and at full
                   resolution, each with 50% and 100% of the images JPEG-compressed (quality 90; the others
                   raw pixels), with one FFCV thread and with one per core (threads that outnumber free cores
                   spin and contend).
  ... FFCV flip    decode twice with FFCV's RandomHorizontalFlip after the crop, as first planned: what moving
                   the flip to the GPU saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip
from PIL import Image

from benchmarks.__main__ import main
from benchmarks.core import host, report, timing
from benchmarks.core.record import Record, peak_memory
from benchmarks.tools.imagenet_like import generate
from engine.config import TrainConfig
from engine.distributed import Runtime
from pipeline.augs import get_recipe
from pipeline.ffcv_loader import (
    DECODES,
    field_values,
    label_pipeline,
    make_ffcv_loader,
    read_beton,
    resolve_order,
    view_pipelines,
)
from pipeline.ffcv_writer import IMAGE_FIELD, LABEL_FIELD, write_beton
from pipeline.torch_loader import build as build_torch_loader

SUITE = "ffcv-cost"  # the name its results carry
IMAGE_SIZE, BATCH_SIZE = 224, 64
# (name, --max-resolution, --compress-probability) of the .betons measured.
BETONS = (
    ("ffcv 256px, 50% JPEG", 256, 0.5),
    ("ffcv 256px, all JPEG", 256, 1.0),
    ("ffcv full res, 50% JPEG", None, 0.5),
    ("ffcv full res, all JPEG", None, 1.0),
)


@dataclasses.dataclass
class Side:
    name: str
    stored: str
    cpu_s_per_image: list[float]
    images_per_s: list[float]


def measure_epochs(batches, epochs: int) -> tuple[list[float], list[float]]:
    """CPU seconds per image and images per second of each epoch after a warm-up one; `batches()` is one epoch."""
    windows = []
    for _ in range(epochs + 1):
        with timing.timed(cpu=True) as window:
            window.iterations = sum(len(batch[0]) for batch in batches())  # images
        windows.append(window)
    return [w.cpu_seconds / w.iterations for w in windows[1:]], [w.iterations / w.seconds for w in windows[1:]]


def torch_side(name: str, data: Path, aug, stored: str, epochs: int) -> Side:
    loader = build_torch_loader(
        str(data), batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, device="cpu", aug=aug, num_workers=0
    )
    with host.torch_threads(1):  # as in a DataLoader worker
        return Side(name, stored, *measure_epochs(lambda: iter(loader.loader), epochs))


def loader_with_ffcv_flip(beton: Path, threads: int):
    """The loader first planned: FFCV's RandomHorizontalFlip after each view's crop, same order and cache."""
    recipe, cpu = get_recipe("v2"), torch.device("cpu")
    views = view_pipelines(recipe, IMAGE_SIZE, cpu, decode="twice")
    for spec in views.values():
        spec.transforms.insert(1, RandomHorizontalFlip(recipe.flip_prob))  # after the decoder
    return Loader(
        str(beton),
        batch_size=BATCH_SIZE,
        num_workers=threads,
        os_cache=False,
        order=OrderOption.QUASI_RANDOM,
        seed=0,
        drop_last=True,
        batches_ahead=3,
        pipelines={LABEL_FIELD: label_pipeline(cpu), IMAGE_FIELD: None, **views},
    )


def ffcv_side(
    name: str, beton: Path, threads: int, epochs: int, decode: str = "twice", ffcv_flip: bool = False
) -> Side:
    """FFCV's loader on `beton` with `threads` decoding threads, besides its batch thread and this one."""
    reader = read_beton(beton)
    images = field_values(reader, IMAGE_FIELD)
    jpeg_share = float((images["mode"] == 0).mean())
    stored = (
        f"{images['width'].mean():.0f}x{images['height'].mean():.0f} mean, {jpeg_share:.0%} JPEG q90, "
        f"{beton.stat().st_size / 2**20:.0f} MiB"
    )
    if ffcv_flip:
        loader, name = loader_with_ffcv_flip(beton, threads), name + ", decode twice + FFCV flip"
    else:
        name += f", decode {decode}"
        order, os_cache = resolve_order(None, None, 1)
        loader = make_ffcv_loader(
            beton,
            batch_size=BATCH_SIZE,
            image_size=IMAGE_SIZE,
            device=torch.device("cpu"),
            recipe=get_recipe("v2"),
            rank=0,
            world_size=1,
            seed=0,
            order=order,
            os_cache=os_cache,
            num_workers=threads,
            batches_ahead=3,
            decode=decode,
        )
    return Side(f"{name}, {report.plural(threads, 'thread')}", stored, *measure_epochs(lambda: iter(loader), epochs))


def jpeg_folder_description(root: Path) -> str:
    paths = sorted(root.rglob("*.jpg"))
    sizes = np.array([Image.open(p).size for p in paths])
    megabytes = sum(p.stat().st_size for p in paths) / 2**20
    return f"{len(paths)} JPEGs q90, {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} mean, {megabytes:.0f} MiB"


def sides_of(data: Path, work: Path, thread_counts: list[int], epochs: int) -> list[Side]:
    stored = jpeg_folder_description(data)
    crop_flip_only = dataclasses.replace(get_recipe("v2"), jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    sides = [
        torch_side("torch v2", data, "v2", stored, epochs),
        torch_side("torch crop+flip", data, crop_flip_only, stored, epochs),
    ]
    for index, (name, max_resolution, compress_probability) in enumerate(BETONS):
        beton = work / f"dataset_{index}.beton"
        write_beton(str(data), beton, max_resolution=max_resolution, compress_probability=compress_probability)
        sides += [ffcv_side(name, beton, threads, epochs, decode) for decode in DECODES for threads in thread_counts]
        if index == 0:  # the first .beton also as first planned, to show what the flip costs on the CPU
            sides += [ffcv_side(name, beton, threads, epochs, ffcv_flip=True) for threads in thread_counts]
        beton.unlink()
    return sides


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", type=int, default=2000, help="ImageNet-like JPEGs to generate when --data is not an image folder"
    )
    parser.add_argument(
        "--thread-counts",
        type=int,
        nargs="+",
        default=None,
        help="FFCV thread counts to measure (default: 1 and all cores)",
    )


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[dict]:
    thread_counts = opts.thread_counts or sorted({1, host.cores()})
    with tempfile.TemporaryDirectory(prefix="ffcv_cost_") as tmp:
        work = Path(tmp)
        data = (
            Path(cfg.data.data)
            if Path(cfg.data.data).is_dir()
            else generate(work / "jpegs", opts.images, seed=0, show_progress=True)
        )
        sides = sides_of(data, work, thread_counts, opts.repeats)
    return records(sides, opts.repeats, thread_counts)


def records(sides: list[Side], repeats: int, thread_counts: list[int]) -> list[Record]:
    """One result per side; its settings are this study's (batch, view size, stored data), not train.py's."""
    cpu_s = {side.name: statistics.median(side.cpu_s_per_image) for side in sides}
    return [
        Record(
            side.name,
            statistics.median(side.images_per_s),
            cpu_s[side.name],
            {"cpu_ms_per_image": 1e3 * cpu_s[side.name]},
            **peak_memory(torch.device("cpu")),
            stage_groups={"host CPU per image, two 224 px views": ["cpu_ms_per_image"]},
            settings=f"batch {BATCH_SIZE}, two {IMAGE_SIZE} px views per image, from {side.stored}",
            notes=[
                f"median over {report.plural(repeats, 'epoch')} of process CPU seconds (all threads) / images; "
                f"target: ffcv <= 1/10 of torch v2",
                f"FFCV thread counts {thread_counts}, torch threads 1",
            ],
            extra={
                "stored": side.stored,
                "cpu_ms_per_image_epochs": [1e3 * c for c in side.cpu_s_per_image],
                "fraction_of_torch_v2": cpu_s[side.name] / cpu_s["torch v2"],
                "fraction_of_torch_crop_flip": cpu_s[side.name] / cpu_s["torch crop+flip"],
            },
        )
        for side in sides
    ]


if __name__ == "__main__":
    sys.exit(main(study=sys.modules[__name__]))

"""Write a dataset to FFCV's `.beton` format, the input of the `ffcv` loader.

    python -m pipeline.ffcv_writer DATA OUT.beton [--split train] [--max-resolution 512] [--jpeg-quality 90]
                                   [--compress-probability 0.5] [--workers W]

DATA is anything `pipeline.datasets` accepts (an ImageFolder root or `fashion-mnist`). Each sample is stored
as an `image` (RGBImageField) and a `label` (IntField). Images are shrunk so their longer side is at most
--max-resolution, then JPEG-compressed with probability --compress-probability (quality --jpeg-quality) and
stored raw otherwise: raw images cost no decoding when loading, JPEGs keep the file small. Fashion-MNIST is
stored at its native 28x28; the loader's random crop resizes to the training size.

The default 512 px keeps ImageNet's typical 500x375 images whole, so the crops are those of the original
images. 256 px cuts the CPU cost of loading about fivefold (0.35 against 1.67 ms per image for two 224 px views,
benchmarks/results/ffcv_cost_cpu.json) but leaves a 0.2-area crop about 110x85 px, upsampled twofold to 224.
Progress is FFCV's own bar; the file's size and the images/s of the write are printed at the end.

FFCV's writer forks worker processes, then waits for their count of written samples: forever, if one of them
dies (seen once in this test suite: two exited workers, the writer asleep in its progress loop). A watchdog
thread therefore watches the workers; if all of them are gone and the writer still waits, it stops the wait,
and the write is tried once more in fresh workers before it fails with a DataError.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter

from pipeline.datasets import resolve_dataset
from pipeline.errors import DataError

# Field names shared with pipeline.ffcv_loader, which checks a .beton has exactly these.
IMAGE_FIELD, LABEL_FIELD = "image", "label"
FASHION_MNIST_SIDE = 28
WORKERS_GONE_GRACE_S = 60.0  # once its workers have exited, FFCV's writer only appends its sample table


@dataclass(frozen=True)
class WriteReport:
    path: Path
    images: int
    size_bytes: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


class FailureRecordingDataset:
    """The dataset as FFCV writer samples, recording an unreadable image instead of raising.

    An exception in one of FFCV's writer processes makes the writer wait forever for its samples, so a failure
    is reported through `failures` (once per process, so the pipe never fills) and a placeholder written in its
    place; `write_beton` then deletes the file and raises.
    """

    PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)

    def __init__(self, dataset, failures: multiprocessing.SimpleQueue):
        self.dataset, self.failures = dataset, failures
        self.reported = False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except DataError as e:
            if not self.reported:
                self.failures.put(str(e))
                self.reported = True
            return self.PLACEHOLDER, 0


def image_field(max_resolution: int | None, jpeg_quality: int, compress_probability: float) -> RGBImageField:
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress probability must be in [0, 1], got {compress_probability}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {jpeg_quality}")
    return RGBImageField(write_mode="proportion", max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                         compress_probability=compress_probability)


class WorkersDied(Exception):
    """Raised inside FFCV's wait loop by `WorkerWatchdog` when every writer worker has exited."""


class WorkerWatchdog(threading.Thread):
    """Watches the processes forked during a write (children with this process's command line); once all
    have exited for WORKERS_GONE_GRACE_S while the writing thread still waits, raises WorkersDied in it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.me, self.writer_thread = psutil.Process(), threading.get_ident()
        self.command = self.me.cmdline()  # what a forked worker's command line is too
        self.before = {child.pid for child in self.me.children()}
        self.done, self.fired = threading.Event(), False

    def workers(self) -> tuple[int, int]:
        """(live, exited) processes forked since the write began; an exited one is a zombie until reaped."""
        live = exited = 0
        for child in self.me.children():
            if child.pid in self.before:
                continue
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    exited += 1
                elif child.cmdline() == self.command:  # not the resource tracker, which runs another command
                    live += 1
            except psutil.Error:  # gone meanwhile
                exited += 1
        return live, exited

    def run(self) -> None:
        gone_since = None
        while not self.done.wait(0.5):
            live, exited = self.workers()
            if live or not exited:
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since > WORKERS_GONE_GRACE_S:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.writer_thread),
                                                           ctypes.py_object(WorkersDied))
                return

    def stop(self) -> None:
        self.done.set()
        self.join()
        if self.fired:  # cancel the exception if the write finished before it was raised
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.writer_thread), None)


def write_beton(data: str, out: str | Path, *, split: str = "train", max_resolution: int | None = 512,
                jpeg_quality: int = 90, compress_probability: float = 0.5, workers: int | None = None,
                verify: bool = True) -> WriteReport:
    """Write `data`'s `split` to `out`; a bad image, or writer workers that die twice, leave no partial file."""
    out = Path(out)
    if not out.parent.is_dir():
        raise DataError(f"output directory {out.parent} does not exist")
    dataset = resolve_dataset(data, split, FASHION_MNIST_SIDE, verify)
    fields = {IMAGE_FIELD: image_field(max_resolution, jpeg_quality, compress_probability), LABEL_FIELD: IntField()}
    start = time.perf_counter()
    for attempt in (1, 2):
        failures = multiprocessing.SimpleQueue()
        watchdog = WorkerWatchdog()
        watchdog.start()
        try:
            writer = DatasetWriter(str(out), fields, num_workers=workers or os.cpu_count() or 1)
            writer.from_indexed_dataset(FailureRecordingDataset(dataset, failures))
            break
        except WorkersDied:
            out.unlink(missing_ok=True)
            if attempt == 2:
                raise DataError(f"FFCV's writer workers died twice before writing every image (their errors are "
                                f"above); no {out} written") from None
        finally:
            watchdog.stop()
    seconds = time.perf_counter() - start
    if not failures.empty():
        out.unlink()
        raise DataError(f"{failures.get()} (no {out} written)")
    return WriteReport(out, len(dataset), out.stat().st_size, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="ImageFolder root, or fashion-mnist[:DIR]")
    parser.add_argument("out", type=Path, help="the .beton file to write")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--max-resolution", type=int, default=512,
                        help="longest side kept, in pixels; 0 keeps full resolution (default 512)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of compressed images (default 90)")
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="fraction of images stored as JPEG rather than raw pixels (default 0.5)")
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        report = write_beton(args.data, args.out, split=args.split, max_resolution=args.max_resolution or None,
                             jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                             workers=args.workers)
    except (DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {report.images} images to {report.path}: {report.size_bytes / 2**20:.1f} MiB, "
          f"{report.images_per_s:.0f} images/s ({report.seconds:.1f} s)")


if __name__ == "__main__":
    main()

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

The file is written as OUT.PID.partial beside OUT and renamed to OUT once complete, so OUT is never a partial
file. SIGINT (Ctrl-C, to the process or its whole group) or SIGTERM stops a write at once: the workers are
killed, the partial file removed, and the command prints `interrupted: nothing written to OUT` and exits with
status 130, as the trainer does.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
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
INTERRUPTED_STATUS = 130  # the shell's status for Ctrl-C, also after SIGTERM (the trainer's too)


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
    return RGBImageField(
        write_mode="proportion",
        max_resolution=max_resolution,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
    )


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

    def kill_workers(self) -> None:
        """Kills and reaps the processes forked since the write began, found by process id rather than through
        multiprocessing, so that a worker forked a moment before the write stopped is not missed."""
        forked = []
        for child in self.me.children():
            with contextlib.suppress(psutil.Error):
                if child.pid not in self.before and child.cmdline() == self.command:
                    child.kill()
                    forked.append(child)
        psutil.wait_procs(forked)

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
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.writer_thread), ctypes.py_object(WorkersDied)
                )
                return

    def stop(self) -> None:
        self.done.set()
        self.join()
        if self.fired:  # cancel the exception if the write finished before it was raised
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.writer_thread), None)


class WriteInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during `write_beton`, raised once its workers and partial file are gone; a KeyboardInterrupt,
    so that callers stop as they would on Ctrl-C."""


class StopOnSignal:
    """While a write runs, SIGINT and SIGTERM raise WriteInterrupted in the main thread of the process that writes.

    FFCV's workers are forked with these handlers; there the handler ignores the signal (a terminal's Ctrl-C reaches
    the whole process group) and the writing process kills them, so no worker prints a KeyboardInterrupt traceback.
    Only the first signal raises: the clean-up it starts is not interrupted by a second. `disarm` ignores signals
    from then on, while a finished file takes its final name. Outside the main thread Python cannot take signals,
    and nothing changes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.pid, self.armed, self.previous = os.getpid(), True, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def handle(self, signum, frame) -> None:
        if os.getpid() == self.pid and self.armed:
            self.armed = False
            raise WriteInterrupted(signal.Signals(signum).name)

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def abandon_write(writer: DatasetWriter, watchdog: WorkerWatchdog, stop: BaseException) -> None:
    """Undoes what FFCV leaves behind when a write stops midway (`stop` raised inside it), so this process can exit.

    The workers are killed, the metadata's shared memory unlinked (no "leaked shared_memory" warning at exit) and the
    progress bar ended on its line. The work queue is told not to be flushed at exit: with no worker left to read
    it, its feeder thread never finishes, and interpreter exit would wait for it forever (multiprocessing's
    _finalize_join). FFCV keeps the queue and the bar to itself, as locals of `DatasetWriter._write_common`, so they
    are taken from that frame in the traceback of `stop` (absent if the write stopped before or after it).
    """
    watchdog.kill_workers()
    for frame, _ in traceback.walk_tb(stop.__traceback__):
        if frame.f_code is DatasetWriter._write_common.__code__:
            if "workqueue" in frame.f_locals:
                frame.f_locals["workqueue"].cancel_join_thread()
            if "progress" in frame.f_locals:
                frame.f_locals["progress"].close()
    metadata = getattr(writer, "metadata_sm", None)
    if isinstance(metadata, SharedMemory):
        metadata.close()
        with contextlib.suppress(FileNotFoundError):  # already unlinked by a write that had finished
            metadata.unlink()


@contextlib.contextmanager
def inherited_objects_frozen():
    """While FFCV forks its workers, the objects they inherit are frozen (gc.freeze), so that no worker's garbage
    collector finalises one: a DALI pipeline still awaiting collection, finalised in a worker, would wait forever
    for its threads, which a fork does not copy."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def partial_path(out: Path) -> Path:
    """Where `out` is written until it is complete: beside it, so the final rename is atomic."""
    return out.with_name(f"{out.name}.{os.getpid()}.partial")


def write_beton(
    data: str,
    out: str | Path,
    *,
    split: str = "train",
    max_resolution: int | None = 512,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    workers: int | None = None,
    verify: bool = True,
) -> WriteReport:
    """Write `data`'s `split` to `out`. A bad image, writer workers that die twice, or SIGINT/SIGTERM (raising
    WriteInterrupted) leave `out` as it was and no partial file."""
    out = Path(out)
    if not out.parent.is_dir():
        raise DataError(f"output directory {out.parent} does not exist")
    partial = partial_path(out)
    with StopOnSignal() as signals:
        try:
            images, seconds = write_partial(
                data,
                partial,
                out,
                split=split,
                max_resolution=max_resolution,
                jpeg_quality=jpeg_quality,
                compress_probability=compress_probability,
                workers=workers,
                verify=verify,
            )
            signals.disarm()  # the file is complete: a signal must not cut its rename short
            partial.replace(out)
        except WriteInterrupted:
            raise WriteInterrupted(f"interrupted: nothing written to {out}") from None
        finally:
            signals.disarm()  # nor the clean-up of a failed write
            partial.unlink(missing_ok=True)  # gone already once renamed
    return WriteReport(out, images, out.stat().st_size, seconds)


def write_partial(
    data: str,
    partial: Path,
    out: Path,
    *,
    split: str,
    max_resolution: int | None,
    jpeg_quality: int,
    compress_probability: float,
    workers: int | None,
    verify: bool,
) -> tuple[int, float]:
    """(images, seconds) of the write itself, to `partial`; a failure raises and leaves `partial` to the caller."""
    dataset = resolve_dataset(data, split, FASHION_MNIST_SIDE, verify)
    fields = {IMAGE_FIELD: image_field(max_resolution, jpeg_quality, compress_probability), LABEL_FIELD: IntField()}
    start = time.perf_counter()
    for attempt in (1, 2):
        failures = multiprocessing.SimpleQueue()
        writer = DatasetWriter(str(partial), fields, num_workers=workers or os.cpu_count() or 1)
        watchdog = WorkerWatchdog()
        watchdog.start()
        try:
            with inherited_objects_frozen():
                writer.from_indexed_dataset(FailureRecordingDataset(dataset, failures))
            break
        except (WorkersDied, WriteInterrupted) as stop:
            abandon_write(writer, watchdog, stop)
            if isinstance(stop, WriteInterrupted):
                raise
            if attempt == 2:
                raise DataError(
                    f"FFCV's writer workers died twice before writing every image (their errors are "
                    f"above); no {out} written"
                ) from None
        finally:
            watchdog.stop()
    seconds = time.perf_counter() - start
    if not failures.empty():
        raise DataError(f"{failures.get()} (no {out} written)")
    return len(dataset), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="ImageFolder root, or fashion-mnist[:DIR]")
    parser.add_argument("out", type=Path, help="the .beton file to write")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument(
        "--max-resolution",
        type=int,
        default=512,
        help="longest side kept, in pixels; 0 keeps full resolution (default 512)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of compressed images (default 90)")
    parser.add_argument(
        "--compress-probability",
        type=float,
        default=0.5,
        help="fraction of images stored as JPEG rather than raw pixels (default 0.5)",
    )
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        report = write_beton(
            args.data,
            args.out,
            split=args.split,
            max_resolution=args.max_resolution or None,
            jpeg_quality=args.jpeg_quality,
            compress_probability=args.compress_probability,
            workers=args.workers,
        )
    except (DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    except WriteInterrupted as e:
        print(e, file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    print(
        f"wrote {report.images} images to {report.path}: {report.size_bytes / 2**20:.1f} MiB, "
        f"{report.images_per_s:.0f} images/s ({report.seconds:.1f} s)"
    )


if __name__ == "__main__":
    main()

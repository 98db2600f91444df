"""What a run says about itself, on rank 0: the progress bar (plain lines where stderr is a file), one line per
epoch, the kNN summary, and TensorBoard scalars with peak memory (engine/scalars.py)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from engine.scalars import Scalars, peak_device_mb, peak_host_rss_mb

console = Console(stderr=True, soft_wrap=True)

LOG_LINE_EVERY_S = 60.0  # where stderr is a file (a scheduler's log), a progress line at most this often


def progress_bar(enabled: bool) -> Progress:
    """A live bar on a terminal; where stderr is a file the report writes plain lines instead (a bar would only
    be drawn once, at the end)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[img_s]:,.0f} img/s  lr {task.fields[lr]:.4g}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
    )


class DataWait:
    """The loader's batches, adding up the host time spent blocked in it (`seconds`): the loop waiting for data.
    No device sync is added: on a GPU the host runs ahead of the queued steps, so it only blocks here when the
    loader is behind."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                self.seconds += time.perf_counter() - start
                yield batch
        finally:
            if hasattr(batches, "close"):
                batches.close()


class Report:
    """Rank 0's account of the run; on the other ranks every method does nothing."""

    def __init__(self, is_main: bool, epochs: int):
        self.is_main, self.epochs = is_main, epochs
        self.progress = progress_bar(is_main)
        self.scalars = Scalars(None)
        self.task = None
        self.last_log_line = time.monotonic()

    def open(self, tb_dir: Path, resume_step: int | None) -> None:
        if self.is_main:
            self.scalars = Scalars(tb_dir, resume_step=resume_step)

    def say(self, line: str) -> None:
        if self.is_main:
            console.print(line)

    def init_knn(self, knn: float | None) -> None:
        self.scalars.add(0, **{"epoch/knn_top1": knn})
        if knn is not None:
            self.say(f"epoch 0 (random init): kNN top-1 {knn:.2f}%")

    def start_epoch(self, epoch: int, steps: int, start: int) -> None:
        self.task = self.progress.add_task(
            f"epoch {epoch + 1}/{self.epochs}", total=steps, completed=start, loss=float("nan"), img_s=0.0, lr=0.0
        )

    def check_in(
        self, epoch: int, step: int, steps: int, global_step: int, loss: float, img_s: float, lr: float
    ) -> None:
        if not self.is_main:
            return
        self.progress.update(self.task, completed=step, loss=loss, img_s=img_s, lr=lr)
        self.scalars.add(global_step, **{"train/loss": loss, "train/lr": lr, "train/img_per_s": img_s})
        if not console.is_terminal and time.monotonic() - self.last_log_line >= LOG_LINE_EVERY_S:
            self.last_log_line = time.monotonic()
            console.print(
                f"epoch {epoch + 1}/{self.epochs} step {step}/{steps}: loss {loss:.4f}  {img_s:,.0f} img/s  lr {lr:.4g}"
            )

    def end_epoch(self, row: dict, global_step: int, device) -> None:
        if not self.is_main:
            return
        knn, skipped = row["knn_top1"], row["skipped_steps"]
        self.scalars.add(
            global_step,
            **{
                "epoch/loss": row["loss"],
                "epoch/knn_top1": knn,
                "epoch/img_per_s": row["img_per_s"],
                "epoch/data_wait_fraction": row["data_wait"],
                "epoch/lr": row["lr"],
                "epoch/peak_device_mb": peak_device_mb(device),
                "epoch/peak_host_rss_mb": peak_host_rss_mb(),
            },
        )
        self.scalars.flush()
        self.progress.console.print(
            f"epoch {row['epoch']}: loss {row['loss']:.4f}  {row['img_per_s']:,.0f} img/s  "
            f"waiting for data {100 * row['data_wait']:.0f}%"
            + (f"  kNN top-1 {knn:.2f}%" if knn is not None else "")
            + (f"  ({skipped} steps skipped by the fp16 GradScaler: non-finite gradients)" if skipped else "")
        )

    def summary(self, rows: list[dict]) -> None:
        knn_rows = [r for r in rows if r["knn_top1"] is not None]
        if len(knn_rows) >= 2:
            self.say(
                f"kNN top-1: {knn_rows[0]['knn_top1']:.2f}% at epoch {knn_rows[0]['epoch']} -> "
                f"{knn_rows[-1]['knn_top1']:.2f}% at epoch {knn_rows[-1]['epoch']}"
            )

    def close(self) -> None:
        self.scalars.close()

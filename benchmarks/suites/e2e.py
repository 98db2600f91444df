"""Loader plus step, run by the trainer itself (engine.trainer.Trainer.run_epoch): the images/s a training run
gets, and how much of its time the host spends blocked waiting for the next batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from benchmarks.core import diagnostics, host, timing, workload
from benchmarks.core.record import Record
from engine.config import TrainConfig
from engine.distributed import Runtime
from engine.trainer import Trainer
from model.moco import no_stage


class NextBatches:
    """The next `steps` batches of a running loader, shaped like a loader for the trainer."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self):
        for _ in range(self.steps):
            yield next(self.batches)


def measure(cfg: TrainConfig, runtime: Runtime, precision: str, backend: str, opts: argparse.Namespace) -> Record:
    cfg = workload.for_backend(cfg, backend, runtime)
    device = runtime.device
    with tempfile.TemporaryDirectory() as out:
        trainer = workload.benchmark_trainer(cfg, out, opts.warmup + opts.steps * opts.repeats)
        try:
            return measure_trainer(trainer, cfg, runtime, backend, opts, device)
        finally:
            trainer.close()


def measure_trainer(trainer: Trainer, cfg: TrainConfig, runtime: Runtime, backend: str, opts, device) -> Record:
    batches = workload.endless(trainer.loader)

    def epoch_of(steps: int) -> float:
        """The trainer's epoch loop over the next `steps` batches; returns the seconds it waited for data."""
        trainer.loader = NextBatches(batches, steps)
        trainer.steps, trainer.step = steps, 0
        trainer.run_epoch()
        return trainer.data_wait.seconds

    host.reset_device_peak(device)
    if opts.warmup:
        epoch_of(opts.warmup)
    windows, waits, workers_rss = [], [], 0.0
    for _ in range(opts.repeats):
        with timing.timed(device, iterations=opts.steps, cpu=True) as window:
            waits.append(epoch_of(opts.steps))
        windows.append(window)
        workers_rss = max(workers_rss, host.children_rss_mb())
    e2e_ms, wait_ms = timing.ms_per_iteration(windows), statistics.median(1e3 * w / opts.steps for w in waits)
    record = workload.throughput_record(
        backend,
        windows,
        cfg,
        runtime,
        workers_rss_mb=workers_rss,
        stages={"data_wait": wait_ms, "step_and_loop": e2e_ms - wait_ms},
        stage_groups={"end to end": ["data_wait", "step_and_loop"]},
        totals={"e2e_step_ms": e2e_ms, "data_wait_ms": wait_ms},
        data_wait_fraction=wait_ms / e2e_ms,
        notes=[
            "data_wait: the trainer's own measure, host time blocked in next(loader); on a GPU earlier steps "
            "may still be running then",
            "run by the trainer's epoch loop: lr set every step, check-ins every --print-freq steps",
        ],
    )
    if opts.trace:
        eager = getattr(trainer.train_step, "step", trainer.train_step)
        trainer.moco.stage = eager.stage = torch.profiler.record_function
        record.traces = [
            diagnostics.write_trace(
                lambda: epoch_of(min(opts.steps, 5)), device, 1, opts.trace, f"e2e_{backend}_rank{runtime.rank}"
            )
        ]
        trainer.moco.stage = eager.stage = no_stage
    return record


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    return [measure(cfg, runtime, precision, backend, opts) for backend in opts.backend]

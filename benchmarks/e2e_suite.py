"""Loader plus step, run by train.py's own `train_epoch`: the images/s a training run gets, and how much of
its time the host spends blocked waiting for the next batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import train
from benchmarks import diagnostics, host, timing, workload
from engine.config import TrainConfig
from engine.distributed import Runtime
from model.moco import no_stage


class WaitTimedBatches:
    """`steps` batches of a running loader, shaped like a loader for train_epoch; adds up the time blocked in next()."""

    def __init__(self, batches, steps: int, channels_last: bool):
        self.batches, self.steps, self.channels_last = batches, steps, channels_last
        self.wait_s = 0.0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            start = time.perf_counter()
            im_q, im_k, labels = next(self.batches)
            self.wait_s += time.perf_counter() - start
            yield workload.in_layout(im_q, self.channels_last), workload.in_layout(im_k, self.channels_last), labels


def measure(cfg: TrainConfig, runtime: Runtime, precision: str, backend: str, opts: argparse.Namespace) -> dict:
    cfg = workload.for_backend(cfg, backend, runtime)
    device = runtime.device
    batches = workload.endless(workload.loader(cfg, runtime, precision, opts.warmup + opts.steps * opts.repeats))
    moco, step = workload.moco_step(cfg, runtime, precision, opts)

    progress = train.progress_bar(False)

    def epoch_of(steps: int) -> float:
        """train_epoch over the next `steps` batches; returns the seconds it was blocked in next(loader)."""
        feed = WaitTimedBatches(batches, steps, opts.channels_last)
        train.train_epoch(cfg, runtime, 0, feed, step, progress)
        return feed.wait_s

    host.reset_device_peak(device)
    if opts.warmup:
        epoch_of(opts.warmup)
    windows, waits, workers_rss = [], [], 0.0
    for _ in range(opts.repeats):
        window = timing.timed_window(device, lambda: waits.append(epoch_of(opts.steps)), 1)
        windows.append(dataclasses.replace(window, iterations=opts.steps))
        workers_rss = max(workers_rss, host.children_rss_mb())
    e2e_ms, wait_ms = timing.ms_per_iteration(windows), statistics.median(1e3 * w / opts.steps for w in waits)
    result = {
        **workload.throughput_record(backend, windows, cfg, runtime, workers_rss),
        "stages": {"data_wait": wait_ms, "step_and_loop": e2e_ms - wait_ms},
        "stage_groups": {"end to end": ["data_wait", "step_and_loop"]},
        "totals": {"e2e_step_ms": e2e_ms, "data_wait_ms": wait_ms},
        "data_wait_fraction": wait_ms / e2e_ms,
        "notes": ["data_wait: host time blocked in next(loader); on a GPU earlier steps may still be running then",
                  "run by train.train_epoch: lr set every step, loss read back every --print-freq steps"],
    }
    if opts.trace:
        moco.stage = step.stage = torch.profiler.record_function
        result["traces"] = [diagnostics.write_trace(lambda: epoch_of(min(opts.steps, 5)), device, 1, opts.trace,
                                                    f"e2e_{backend}_rank{runtime.rank}")]
        moco.stage = step.stage = no_stage
    return result


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[dict]:
    return [measure(cfg, runtime, precision, backend, opts) for backend in opts.backend]

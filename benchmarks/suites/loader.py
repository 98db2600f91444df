"""A loader alone, batches drawn as fast as it gives them: images/s, host CPU cost, memory.

Host CPU-seconds per image is the cost that decides how many cores a GPU needs to stay fed; it counts the
loader's worker processes and threads as well as this process.
"""

from __future__ import annotations

import argparse

from benchmarks.core import diagnostics, host, timing, workload
from benchmarks.core.record import Record
from engine.config import TrainConfig
from engine.distributed import Runtime


def measure(cfg: TrainConfig, runtime: Runtime, precision: str, backend: str, opts: argparse.Namespace) -> Record:
    cfg = workload.for_backend(cfg, backend, runtime)
    device = runtime.device
    loader = workload.loader(cfg, runtime, precision, batches=opts.warmup + opts.steps * opts.repeats)
    batches = workload.endless(loader)

    def next_batch():
        next(batches)

    host.reset_device_peak(device)
    for _ in range(opts.warmup):
        next_batch()
    windows, workers_rss = [], 0.0
    for _ in range(opts.repeats):
        windows.append(timing.timed_window(device, next_batch, opts.steps))
        workers_rss = max(workers_rss, host.children_rss_mb())
    record = workload.throughput_record(
        backend,
        windows,
        cfg,
        runtime,
        workers_rss_mb=workers_rss,
        stages={"next_batch": timing.ms_per_iteration(windows)},
        stage_groups={"loader (wall)": ["next_batch"]},
        notes=[loader_note(backend, cfg)],
    )
    if opts.trace:
        record.traces = [
            diagnostics.write_trace(
                next_batch, device, min(opts.steps, 5), opts.trace, f"loader_{backend}_rank{runtime.rank}"
            )
        ]
    return record


def loader_note(backend: str, cfg: TrainConfig) -> str:
    if backend == "synthetic":
        return "synthetic: two pre-made on-device batches, cycled; the ceiling any loader can reach"
    return f"{backend}: {cfg.data.workers} workers; host CPU includes the live worker processes and threads"


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    return [measure(cfg, runtime, precision, backend, opts) for backend in opts.backend]

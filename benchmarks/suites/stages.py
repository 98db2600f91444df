"""Everything lined up in one table: the loader's pieces, the loader alone, every step stage, the step totals
(instrumented and plain) and the end-to-end step, so the slowest link is plain to see.
"""

from __future__ import annotations

import argparse

from benchmarks.core import torch_loader_pieces
from benchmarks.core.record import Record
from benchmarks.suites import e2e as e2e_suite
from benchmarks.suites import loader as loader_suite
from benchmarks.suites import step as step_suite
from engine.config import ConfigError, TrainConfig
from engine.distributed import Runtime


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    if len(opts.backend) != 1:
        raise ConfigError("the stages suite lines up one loader: give one --backend")
    backend = opts.backend[0]
    loader = loader_suite.measure(cfg, runtime, precision, backend, opts)
    step = step_suite.measure(cfg, runtime, precision, opts)
    e2e = e2e_suite.measure(cfg, runtime, precision, backend, opts)
    groups, notes, pieces = {}, [], {}
    if backend == "torch":
        pieces = torch_loader_pieces.measure(cfg, runtime, precision, opts.sample_images)
        groups["loader pieces (1 core)"] = list(pieces)
        notes.append(
            f"loader pieces: each timed alone on {opts.sample_images} images, one thread, scaled to a "
            f"batch; {cfg.data.workers} workers share read_decode + augment + collate"
        )
    elif backend != "synthetic":
        notes.append(f"{backend} reads, decodes and augments in one pipeline; only its total (next_batch) is timed")
    device_peaks = [r.peak_device_mb for r in (loader, step, e2e) if r.peak_device_mb is not None]
    return [
        Record(
            backend,
            e2e.images_per_s,
            e2e.cpu_s_per_image,
            {**pieces, **loader.stages, **step.stages, **e2e.stages},
            peak_host_rss_mb=e2e.peak_host_rss_mb,
            peak_device_mb=max(device_peaks) if device_peaks else None,
            workers_rss_mb=max(loader.workers_rss_mb, e2e.workers_rss_mb),
            stage_groups={**groups, **loader.stage_groups, **step.stage_groups, **e2e.stage_groups},
            totals={"loader_batch_ms": loader.stages["next_batch"], **step.totals, **e2e.totals},
            loader_images_per_s=loader.images_per_s,
            step_images_per_s=step.images_per_s,
            data_wait_fraction=e2e.data_wait_fraction,
            sync_check=step.sync_check,
            traces=loader.traces + step.traces + e2e.traces,
            notes=notes + loader.notes + step.notes + e2e.notes,
        )
    ]

"""The MoCo step alone, on synthetic on-device batches: images/s and where the step's time goes.

Two kinds of run alternate, `--repeats` times each, so drifting load hits both alike:
  - plain: no stage hooks, one sync per window; gives images/s and the true step time;
  - instrumented: a StageTimer on MoCo's and MocoStep's stage hooks; gives ms per stage and the step time as
    the instrumented run saw it (both averaged over the middle half of the steps), so the stages can be
    checked to add up to it.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from benchmarks.core import diagnostics, host, timing, workload
from benchmarks.core.record import Record
from engine.config import TrainConfig
from engine.cuda_graph import GraphedStep
from engine.distributed import Runtime
from model.distributed import concat_all_gather
from model.moco import no_stage

COLLECTIVES = "all-gathers (inside shuffle, unshuffle, queue_update)"


def set_stage(moco, step, stage) -> None:
    moco.stage = step.stage = stage


def measure(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> Record:
    cfg = workload.for_backend(cfg, "synthetic", runtime)
    device = runtime.device
    moco, step = workload.moco_step(cfg, runtime, precision)
    eager = step.step if isinstance(step, GraphedStep) else step  # a graph replay shows no stages
    batches = [(q, k) for q, k, _ in workload.loader(cfg, runtime, precision, batches=2)]
    inputs = itertools.cycle(batches)

    def one_step():
        step(*next(inputs))

    timer = timing.StageTimer(device)

    def instrumented_step():
        with timer.step():
            eager(*next(inputs))

    host.reset_device_peak(device)
    for _ in range(opts.warmup):
        one_step()
    windows = []
    for _ in range(opts.repeats):
        windows.append(timing.timed_window(device, one_step, opts.steps))
        set_stage(moco, eager, timer)
        timing.timed_window(device, instrumented_step, opts.steps)
        set_stage(moco, eager, no_stage)
    typical = timing.typical_steps(timer.results())
    stages = timing.mean_stages(typical)
    groups = {"step": list(stages)}
    notes = []
    if runtime.world_size > 1:
        stages["all_gathers"] = all_gathers_ms(batches[0][1], cfg.model.moco_dim, opts.steps)
        groups[COLLECTIVES] = ["all_gathers"]
        notes.append(
            "all_gathers: the step's three all-gathers timed alone; shuffle, unshuffle and queue_update "
            "already include them, and backward includes DDP's gradient all-reduce"
        )
    else:
        notes.append("single device: Shuffle BN is emulated (split BN), so the step has no all-gathers")
    if eager is not step:
        notes.append("cuda graphs: images/s and step_ms from graph replays; the stages from eager steps")
    record = workload.throughput_record(
        "synthetic",
        windows,
        cfg,
        runtime,
        stages=stages,
        stage_groups=groups,
        totals={
            "step_ms": timing.ms_per_iteration(windows),
            "step_ms_instrumented": statistics.fmean(t.total_ms for t in typical),
            "stage_sum_ms": sum(stages[name] for name in groups["step"]),
        },
        notes=notes,
    )
    if opts.check_syncs:
        record.sync_check = diagnostics.check_no_host_syncs(one_step, device)
    if opts.check_copies:

        def install(stage):
            set_stage(moco, eager, stage)
            return lambda: set_stage(moco, eager, no_stage)

        record.extra["copy_check"] = diagnostics.count_copies(lambda: eager(*next(inputs)), install)
        if cfg.step.compile:
            notes.append("copies: compiled regions run as fused kernels, whose copies are no ATen ops to count")
    if opts.trace:
        set_stage(moco, eager, torch.profiler.record_function)
        record.traces = [
            diagnostics.write_trace(one_step, device, min(opts.steps, 5), opts.trace, f"step_rank{runtime.rank}")
        ]
        set_stage(moco, eager, no_stage)
    return record


def all_gathers_ms(im_k: torch.Tensor, dim: int, repeats: int) -> float:
    """Median ms of the step's all-gathers: the key images (shuffle), then the keys twice (unshuffle, queue)."""
    keys = torch.randn(im_k.shape[0], dim, device=im_k.device)
    timer = timing.StageTimer(im_k.device)
    for _ in range(repeats):
        with timer.step("all_gathers"):
            concat_all_gather(im_k)
            concat_all_gather(keys)
            concat_all_gather(keys)
    return statistics.median(t.total_ms for t in timer.results())


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    return [measure(cfg, runtime, precision, opts)]

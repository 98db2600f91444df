"""What writing a checkpoint costs a training run: the state's size, the pause the loop takes to copy it to host
memory (the only part on the loop's thread), how long the background write takes, and how much slower the steps
run while it writes (the writer shares the host CPU and, for pickling, the interpreter).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks.core import report, timing, workload
from benchmarks.core.record import Record, peak_memory
from engine.config import TrainConfig
from engine.distributed import Runtime


def measure(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> Record:
    cfg = workload.for_backend(cfg, "synthetic", runtime)
    device = runtime.device
    with tempfile.TemporaryDirectory() as out:
        trainer = workload.benchmark_trainer(cfg, out, opts.warmup + opts.steps * (2 * opts.repeats + 1))
        try:
            batches = workload.endless(trainer.loader)

            def step_ms() -> float:
                with timing.timed(device) as step:
                    trainer.train_step(*next(batches)[:2])
                return step.ms

            for _ in range(opts.warmup):
                step_ms()
            trainer.step = 1  # a mid-epoch checkpoint: RNG, loader state and loss sum go with it
            trainer.steps, trainer.loss_sum = opts.steps, next(batches)[0].new_zeros(())
            alone, during, pauses, writes, sizes, cpu_s = [], [], [], [], [], 0.0
            for _ in range(opts.repeats):
                with timing.timed(cpu=True) as steps:
                    alone += [step_ms() for _ in range(opts.steps)]
                cpu_s += steps.cpu_seconds
                with timing.timed() as write:
                    with timing.timed() as pause:
                        trainer.save()
                    while trainer.checkpoints.writer.thread.is_alive():
                        during.append(step_ms())
                pauses.append(pause.ms)
                writes.append(write.ms)
                trainer.checkpoints.writer.wait()
                sizes.append(trainer.run_dir.last_checkpoint.stat().st_size / 2**20)
        finally:
            trainer.close()
    alone_ms = statistics.median(alone)
    during_ms = statistics.median(during) if during else alone_ms
    images = len(alone) * workload.per_rank_batch(cfg, runtime)
    return Record(
        "synthetic",
        cfg.optim.batch_size / (alone_ms / 1e3),
        cpu_s / images,
        {
            "loop_pause": statistics.median(pauses),
            "background_write": statistics.median(writes),
            "step_alone": alone_ms,
            "step_during_write": during_ms,
        },
        **peak_memory(device),
        stage_groups={
            "on the loop's thread": ["loop_pause"],
            "on the writer's thread": ["background_write"],
            "one step": ["step_alone", "step_during_write"],
        },
        alternative_groups=["one step"],
        notes=[
            f"checkpoint_last of {statistics.median(sizes):,.0f} MB (model, queue, optimizer, config, RNG); "
            f"loop_pause copies it to host memory, background_write pickles, writes and fsyncs it",
            overlap_note(len(during), opts.repeats),
        ],
        extra={"checkpoint_mb": statistics.median(sizes)},
    )


def overlap_note(steps_during: int, writes: int) -> str:
    """What step_during_write is the median of; with no step to time it repeats step_alone."""
    during = f"during {report.plural(writes, 'write')}"
    if not steps_during:
        return f"no step ran {during}: step_during_write repeats step_alone"
    return f"step_during_write: median of {report.plural(steps_during, 'step')} run {during}"


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    return [measure(cfg, runtime, precision, opts)]

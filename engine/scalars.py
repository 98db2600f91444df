"""TensorBoard scalars under OUT/tb, written by rank 0: what the progress line and metrics.jsonl say, over time.

    tensorboard --logdir runs/moco/tb

train/* every --print-freq steps (x: global step), epoch/* once an epoch (x: epoch). A resumed run purges what
the interrupted one wrote after its checkpoint, so every curve is the run that is kept.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def peak_host_rss_mb() -> float:
    """Peak resident memory of this process over its life (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mb(device: torch.device) -> float | None:
    """Peak memory torch's allocator handed out (DALI's own pool is not in it); None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class Scalars:
    def __init__(self, log_dir: Path | None, resume_step: int | None = None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # What the interrupted run wrote after its checkpoint's step goes; that step's own scalars were
            # written before the checkpoint was, so they stay, and the resumed run writes only later steps.
            purge_step = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add(self, step: int, **values: float | None) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

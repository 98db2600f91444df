"""Process-group set-up under torchrun (NCCL on GPUs, gloo on CPUs, an explicit timeout), and the few
collectives the trainer itself needs. A plain process needs no process group."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_runtime(device: torch.device, timeout_minutes: float = 30.0) -> Runtime:
    """Joins the process group torchrun describes. The timeout is what a collective may wait for a slow rank
    before it fails (rank 0's checkpoint write, a straggler), set here rather than left to each backend's."""
    world_size = world_size_from_env()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return Runtime(rank=int(os.environ.get("RANK", "0")), world_size=world_size, device=device)


def refuse_hanging_restarts() -> None:
    """torchrun (c10d rendezvous) by default shares its rendezvous store with the ranks and keeps the previous
    round's keys there, so ranks restarted by --max-restarts find the dead ones' and wait for them until the
    collective timeout (pytorch/pytorch#135712). No key tells the ranks of one round apart from the last one's
    (each node counts its own restarts), so a launch that would hang at its first restart is refused before it
    joins a process group."""
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    ):
        raise ConfigError(
            "torchrun --max-restarts with its shared rendezvous store hangs the restarted ranks "
            "(pytorch/pytorch#135712): launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
        )


def max_over_ranks(values: torch.Tensor, runtime: Runtime) -> list:
    """Each entry's largest value over the ranks, on the host: the one read the trainer's check-ins make."""
    if runtime.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def from_main(obj, runtime: Runtime):
    """Rank 0's `obj` on every rank."""
    if runtime.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_on_main(obj, runtime: Runtime) -> list | None:
    """Every rank's `obj` in rank order on rank 0 (None elsewhere)."""
    if runtime.world_size == 1:
        return [obj]
    gathered = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""What a result must say about the machine: device name, library versions, host CPU time and memory."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

# Distribution names whose versions a result records when installed (DALI's carries its CUDA flavour).
OPTIONAL_LIBRARIES = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "ffcv", "matplotlib", "lightly")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cores()} logical cores)"


def cores() -> int:
    """The logical cores this process may run on: what a run here can use, whatever the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
    }
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    for name in OPTIONAL_LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its children, live ones included.

    getrusage(RUSAGE_CHILDREN) only counts children that have exited, and DataLoader workers live as long as
    the loader, so live children are read one by one (at the kernel's clock-tick resolution).
    """
    usages = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages) + over_live_children(lambda c: sum(c.cpu_times()[:2]))


def children_rss_mb() -> float:
    """Resident memory of the live children (loader workers) now; pages they share with us count again."""
    return over_live_children(lambda child: child.memory_info().rss) / 2**20


def over_live_children(read) -> float:
    """The sum of `read(child)` over this process's live children, those that exit meanwhile left out."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            total += read(child)
        except psutil.NoSuchProcess:
            continue
    return total


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def torch_threads(count: int | None):
    """torch's intra-op thread count set to `count` (unchanged if None) inside, put back after. One thread is
    how a DataLoader worker runs torch ops, and the steadiest setting on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count or threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

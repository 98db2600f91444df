"""What a result must say about the machine: device name, library versions, host CPU time and memory."""

from __future__ import annotations

import importlib.metadata
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
    return f"{cpu_model()} ({psutil.cpu_count()} logical cores)"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "torchvision": importlib.metadata.version("torchvision")}
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
    total = sum(_user_plus_system(resource.getrusage(who)) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _user_plus_system(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def children_rss_mb() -> float:
    """Resident memory of the live children (loader workers) now; pages they share with us count again."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


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

"""Evidence beyond the figures: a profiler trace to read, and proof that the step never blocks the host."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.timing import synchronize


def write_trace(iteration, device: torch.device, iterations: int, out_dir: Path, name: str) -> str:
    """A torch.profiler Chrome trace (chrome://tracing, Perfetto) of `iterations` calls; returns its path.

    Stages show as named ranges when the caller has set the stage hooks to `torch.profiler.record_function`.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(iterations):
            iteration()
        synchronize(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    profiler.export_chrome_trace(str(path))
    return str(path)


def check_no_host_syncs(iteration, device: torch.device, iterations: int = 3) -> dict:
    """Runs `iteration` under set_sync_debug_mode('error'): any host-device sync in it raises."""
    if device.type != "cuda":
        return {"status": "skipped", "note": "no GPU: CPU ops have no host-device sync to catch"}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(iterations):
            iteration()
    except RuntimeError as e:
        return {"status": "failed", "note": str(e).strip().splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return {"status": "passed", "note": f"{iterations} steps ran under torch.cuda.set_sync_debug_mode('error')"}

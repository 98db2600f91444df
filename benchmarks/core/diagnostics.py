"""Evidence beyond the figures: a profiler trace to read, and proof that the step never blocks the host."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.core.timing import synchronize

# ATen ops whose result the host must read (a value, or an output size that depends on the data): on a GPU
# each one waits for the device. The CPU dispatches the same ops, so they can be caught there too.
HOST_READ_OPS = frozenset({"_local_scalar_dense", "nonzero", "equal", "allclose", "masked_select", "_unique2",
                           "unique_dim", "unique_consecutive"})
INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # host-read with a boolean mask


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


class HostReads(TorchDispatchMode):
    """Records every ATen op, in forward, backward and optimizer alike, that reads device data on the host:
    `.item()`, `int(t)`, `if t:`, nonzero, boolean-mask indexing, unique... Device-to-host copies (`.cpu()`,
    `.tolist()`) of a CPU tensor are no ATen ops, so only the GPU check sees those."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        masked = name in INDEX_OPS and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if name in HOST_READ_OPS or masked:
            self.found.append(f"{name} (boolean mask)" if masked else name)
        return func(*args, **(kwargs or {}))


def check_no_host_syncs(iteration, device: torch.device, iterations: int = 3) -> dict:
    """On a GPU, runs `iteration` under set_sync_debug_mode('error'): any host-device sync in it raises.
    On the CPU, runs it under `HostReads`: any op that would sync on a GPU is listed."""
    if device.type != "cuda":
        with HostReads() as reads:
            for _ in range(iterations):
                iteration()
        if reads.found:
            return {"status": "failed", "note": f"ops that read device data on the host: {sorted(set(reads.found))}"}
        return {"status": "passed", "note": f"{iterations} steps dispatched no op that reads device data on the "
                                            "host (item, nonzero, boolean-mask indexing, ...)"}
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

"""Evidence beyond the figures: a profiler trace to read, and proof that the step never blocks the host."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.core.timing import synchronize

# ATen ops whose result the host must read (a value, or an output size that depends on the data): on a GPU
# each one waits for the device. The CPU dispatches the same ops, so they can be caught there too.
HOST_READ_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "equal",
        "allclose",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    }
)
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
        return {
            "status": "passed",
            "note": f"{iterations} steps dispatched no op that reads device data on the "
            "host (item, nonzero, boolean-mask indexing, ...)",
        }
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


# ATen ops that move bytes without arithmetic. `contiguous()` and `.to(memory_format=...)` reach the dispatcher
# as clone / _to_copy (and not at all when there is nothing to do); `x[idx]` is `index` (a gather).
COPY_OPS = frozenset({"copy_", "clone", "_to_copy", "cat", "stack", "index", "index_select", "repeat"})
PROJECT_ROOT = str(Path(__file__).resolve().parents[2]) + os.sep


def _strides_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when `b` holds `a`'s elements in another order in memory (a layout conversion)."""
    return a.dim() == b.dim() and a.numel() > 1 and tuple(a.stride()) != tuple(b.stride())


class CopyCounter(TorchDispatchMode):
    """Counts, per stage, the bytes that copies and layout conversions write in the ops it sees: forward,
    backward and optimizer alike (the CPU's autograd runs the backward on this thread). It dispatches on the
    CPU, so it is the proxy for a GPU's memory traffic where no GPU is at hand. Each copy is recorded with its
    op, whether it changes the layout, and the project source line that issued it (`autograd` for a backward
    op of torch's own). Use `stage` as the MoCo and MocoStep stage hook."""

    def __init__(self):
        super().__init__()
        self.current = "outside stages"
        self.copies: dict[tuple[str, str, str, bool], list[int]] = {}  # (stage, op, where, layout) -> [count, bytes]

    def stage(self, name: str):
        counter = self

        class _Stage:
            def __enter__(self):
                self.outer, counter.current = counter.current, name

            def __exit__(self, *exc):
                counter.current = self.outer

        return _Stage()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        if name in COPY_OPS:
            result = out[0] if isinstance(out, (tuple, list)) else out
            source = args[1] if name == "copy_" else args[0]
            layout = isinstance(source, torch.Tensor) and _strides_differ(source, result)
            key = (self.current, name, _caller(), layout)
            entry = self.copies.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += result.numel() * result.element_size()
        return out

    def by_stage(self) -> dict[str, float]:
        """MB written by copies, per stage."""
        totals: dict[str, float] = {}
        for (stage, *_), (_, nbytes) in self.copies.items():
            totals[stage] = totals.get(stage, 0.0) + nbytes / 2**20
        return totals

    def rows(self) -> list[dict]:
        return [
            {"stage": stage, "op": op, "where": where, "layout_change": layout, "count": count, "mb": nbytes / 2**20}
            for (stage, op, where, layout), (count, nbytes) in sorted(self.copies.items())
        ]


def _caller() -> str:
    """file:line of the innermost frame in the project's own code; `autograd` when torch's backward engine
    issued the op (a backward formula of torch's own, not a custom Function's)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if frame.f_code.co_name == "_engine_run_backward":
            return "autograd"
        if filename.startswith(PROJECT_ROOT) and "site-packages" not in filename:
            return f"{os.path.relpath(filename, PROJECT_ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside the project"


def count_copies(iteration, set_stage_hook, iterations: int = 1) -> dict:
    """Runs `iteration` under a CopyCounter whose stage hook `set_stage_hook` installs (and restores); returns
    MB written by copies per stage and per step, and one row per (stage, op, source line, layout change)."""
    with CopyCounter() as counter:
        restore = set_stage_hook(counter.stage)
        try:
            for _ in range(iterations):
                iteration()
        finally:
            restore()
    per_step = {stage: mb / iterations for stage, mb in counter.by_stage().items()}
    rows = counter.rows()
    for row in rows:
        row["count"] /= iterations
        row["mb"] /= iterations
    return {
        "mb_per_step": sum(per_step.values()),
        "mb_per_stage": per_step,
        "copies": rows,
        "layout_changes": sum(r["count"] for r in rows if r["layout_change"]),
    }

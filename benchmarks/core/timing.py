"""Timers that do not perturb what they time: `timed` (and `timed_window`) for a block, StageTimer for a step's
stages.

On a GPU, stage boundaries are CUDA events: recording one costs no host sync, so an instrumented step keeps
its asynchrony and the events are read once, after a single synchronize at the end. On the CPU every op is
synchronous, so perf_counter after the op is the time. NVTX ranges mark every stage on a GPU, so an
`nsys profile` timeline shows the same names as the tables.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from benchmarks.core import host


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTiming:
    total_ms: float
    stages: dict[str, float]


class StageTimer:
    """The `stage` hook of MoCo and MocoStep: marks each named stage of each step, NVTX-annotated on a GPU. A
    mark is a recorded CUDA event on a GPU, perf_counter on the CPU.

    Use `with timer.step(): ...` around a step, then `results()` once: it synchronises and reads all marks.
    """

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self._steps: list[tuple[object, object, list]] = []
        self._current: list | None = None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    @contextmanager
    def __call__(self, name: str):
        with nvtx_range(name, self.cuda):
            start = self._mark()
            yield
            self._current.append((name, start, self._mark()))

    @contextmanager
    def step(self, name: str = "step"):
        self._current = []
        with nvtx_range(name, self.cuda):
            start = self._mark()
            yield
            self._steps.append((start, self._mark(), self._current))
        self._current = None

    def results(self) -> list[StepTiming]:
        synchronize(self.device)
        timings = []
        for start, end, marks in self._steps:
            stages: dict[str, float] = {}
            for name, s, e in marks:
                stages[name] = stages.get(name, 0.0) + self._ms(s, e)
            timings.append(StepTiming(self._ms(start, end), stages))
        self._steps = []
        return timings


@contextmanager
def nvtx_range(name: str, enabled: bool):
    if not enabled:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


@dataclass
class Window:
    """One timed run of `iterations` calls: wall seconds (device work included) and, where asked for, host CPU
    seconds (this process's and its children's)."""

    iterations: int
    seconds: float = 0.0
    cpu_seconds: float | None = None

    @property
    def ms(self) -> float:
        """ms per iteration."""
        return 1e3 * self.seconds / self.iterations


@contextmanager
def timed(device: torch.device | None = None, iterations: int = 1, cpu: bool = False):
    """The one timer: the block as a Window, the device synchronised at both ends. Host CPU time is read only
    with `cpu`: reading the loader workers' costs a few ms of this process's own."""
    window = Window(iterations)
    synchronize(device)
    cpu0, t0 = host.cpu_seconds() if cpu else None, time.perf_counter()
    yield window
    synchronize(device)
    window.seconds = time.perf_counter() - t0
    if cpu:
        window.cpu_seconds = host.cpu_seconds() - cpu0


def timed_window(device: torch.device, iteration, iterations: int) -> Window:
    """Calls `iteration()` `iterations` times with no sync in between, and one at the end; CPU time included."""
    with timed(device, iterations, cpu=True) as window:
        for _ in range(iterations):
            iteration()
    return window


def typical_steps(timings: list[StepTiming]) -> list[StepTiming]:
    """The middle half of the steps by total time.

    Averaged over these steps, stage times resist preemption and stragglers as a median does, and still add
    up to the step time (medians of parts do not add up to the median of the whole).
    """
    ordered = sorted(timings, key=lambda t: t.total_ms)
    return ordered[len(ordered) // 4 : len(ordered) - len(ordered) // 4]


def mean_stages(timings: list[StepTiming]) -> dict[str, float]:
    """Mean ms of each stage over the steps, in the order the stages ran."""
    names = list(dict.fromkeys(name for t in timings for name in t.stages))
    return {name: statistics.fmean(t.stages.get(name, 0.0) for t in timings) for name in names}


def images_per_s(windows: list[Window], images_per_iteration: int) -> float:
    return statistics.median(w.iterations * images_per_iteration / w.seconds for w in windows)


def ms_per_iteration(windows: list[Window]) -> float:
    return statistics.median(w.ms for w in windows)


def cpu_s_per_image(windows: list[Window], images_per_iteration: int) -> float:
    return sum(w.cpu_seconds for w in windows) / sum(w.iterations * images_per_iteration for w in windows)

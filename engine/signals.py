"""Stopping a run where nothing is lost: a signal only asks, and the trainer stops at its next check-in, where
every rank agrees on the same step, writes one checkpoint and exits.

SIGTERM is what schedulers send (SLURM to every process of a job, Kubernetes before a kill), SIGINT is Ctrl-C,
SIGUSR1 is SLURM's advance notice (`#SBATCH --signal=USR1@120`). In a single process a second signal stops at
once; under torchrun the launcher escalates (it kills what has not stopped 30 s after its SIGTERM), and the
same signal often arrives twice there (from the scheduler, then forwarded by torchrun), so it only asks.
"""

from __future__ import annotations

import contextlib
import os
import signal


class StopSignals:
    """A context: while inside, the stop signals set `requested` instead of ending the process, and the first one
    is acknowledged at once on stderr (when `announce`), since what it waits for (a step, a kNN pass) can take a
    while."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, second_signal_stops_at_once: bool, announce: bool = True):
        self.second_signal_stops_at_once = second_signal_stops_at_once
        self.announce = announce
        self.requested = False
        self.deferring = self.deferred_stop = False
        self.previous: dict = {}

    def __call__(self, signum, frame) -> None:
        if self.requested and self.second_signal_stops_at_once:
            if self.deferring:
                self.deferred_stop = True
                return
            raise KeyboardInterrupt
        if not self.requested and self.announce:
            at_once = "; a second signal stops at once" if self.second_signal_stops_at_once else ""
            os.write(
                2,
                f"{signal.Signals(signum).name}: stopping after the current step or kNN pass, with a "
                f"checkpoint{at_once}\n".encode(),
            )
        self.requested = True

    @contextlib.contextmanager
    def deferred(self):
        """A second signal inside waits for the block's end: a checkpoint being handed to its writer is kept."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.deferred_stop:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopSignals":
        self.previous = {sig: signal.signal(sig, self) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

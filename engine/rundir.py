"""A run's output folder: locked while the run lives, its metrics.jsonl, and where its checkpoints go."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from engine.config import ConfigError


class RunDir:
    LAST = "checkpoint_last.pth.tar"

    def __init__(self, path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.lock_file = None

    @property
    def last_checkpoint(self) -> Path:
        return self.path / self.LAST

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.path / f"checkpoint_{epoch:04d}.pth.tar"

    def checkpoints(self) -> list[Path]:
        """This folder's checkpoints, newest first: checkpoint_last, then checkpoint_EPOCH by falling epoch."""
        epochs = sorted(self.path.glob("checkpoint_[0-9]*.pth.tar"), key=lambda p: p.name, reverse=True)
        return ([self.last_checkpoint] if self.last_checkpoint.is_file() else []) + epochs

    def earlier_run_files(self) -> list[str]:
        """What an earlier run left here (checkpoints of any name, metrics, TensorBoard events), by name."""
        found = sorted(p.name for p in self.path.glob("checkpoint*.pth.tar"))
        found += [name for name in ("metrics.jsonl", "tb") if (self.path / name).exists()]
        return found

    def holds(self, path: Path) -> bool:
        return path.resolve().parent == self.path.resolve()

    def open(self) -> None:
        """Creates and locks the folder, or says in one line why this run cannot write there: not a folder, not
        writable, or in use by a live run (two runs would interleave their metrics and overwrite each other's
        checkpoints)."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock_file = open(self.path / ".lock", "a+")
        except OSError as e:
            raise ConfigError(f"--out {self.path} cannot be written: {e.strerror}") from None
        try:  # a POSIX lock: not inherited by forked loader workers, released by the kernel when the run dies
            fcntl.lockf(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock_file.seek(0)
            owner = self.lock_file.read().strip() or "?"
            self.lock_file.close()
            raise ConfigError(
                f"--out {self.path} is in use by another run (pid {owner}); wait for it to end or choose another --out"
            ) from None
        self.lock_file.seek(0)
        self.lock_file.truncate()
        self.lock_file.write(str(os.getpid()))
        self.lock_file.flush()

    def refuse_overwrite(self) -> None:
        """A run that does not continue this folder's own must not overwrite what an earlier one left."""
        found = self.earlier_run_files()
        if found:
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise ConfigError(
                f"--out {self.path} already holds a run ({shown}); continue it with --resume auto, "
                f"or choose another --out"
            )

    def close(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()  # releases the lock
            self.lock_file = None

    def rows(self) -> list[dict]:
        """The metrics rows written so far. A last line cut short by a kill during its append is left out."""
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def restart_metrics(self, keep_through_epoch: int | None) -> None:
        """A fresh run starts an empty file and no TensorBoard events; a resumed one keeps the rows of the epochs
        it does not train again."""
        if keep_through_epoch is None:
            shutil.rmtree(self.path / "tb", ignore_errors=True)
        rows = [] if keep_through_epoch is None else [r for r in self.rows() if r["epoch"] <= keep_through_epoch]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

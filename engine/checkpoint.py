"""The run's checkpoints, as torchtitan's checkpoint manager keeps them: which one a run goes on from, the checks
a resume makes, what each save holds (model, optimizer, scaler, and inside an epoch every rank's RNG, loader
state and loss sum), the background write, and what a stop keeps. The format, and the atomic write itself, are
model/checkpoint.py."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import torch

from engine.config import ConfigError, TrainConfig, changed_settings, to_dict
from engine.distributed import Runtime, from_main, gather_on_main
from engine.optim import check_same_optimizer, lay_out_state_like_params
from engine.reporting import console
from engine.rundir import RunDir
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, with_prefix, without_prefix

# What decides which images the rest of an epoch sees, and in what order: fixed inside an epoch.
FIXED_INSIDE_AN_EPOCH = ("--data", "--loader", "--loader-option", "--seed")


def to_host(obj):
    """A copy of `obj` (dicts, lists and tensors) on the host, no longer shared with the training that goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(value) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, so that training pays only for the copy to host memory
    (`to_host`), not for serialising and syncing a few hundred MB to disk. One write at a time; a failed write
    raises at the next `submit` or `wait`, and the interpreter waits for a write in progress before it exits."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, state: dict, path: Path, *copies: Path, then=None) -> None:
        """`then()` runs on the writer's thread once the checkpoint is on disk: what must not be recorded before."""
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(state, path, copies, then), name="checkpoint-writer")
        self.thread.start()

    def _write(self, state: dict, path: Path, copies: tuple, then) -> None:
        try:
            save_checkpoint(state, path, *copies)
            if then is not None:
                then()
        except BaseException as e:  # handed to the training thread at its next wait()
            self.error = e

    def failed(self, wait: bool = False) -> bool:
        """Whether the last write failed, so far (or, with `wait`, once it has ended); raises nothing."""
        if wait and self.thread is not None:
            self.thread.join()
        return self.error is not None

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"writing a checkpoint failed: {error}") from error


class NothingLeft(ConfigError):
    """Resuming a run that has already trained every epoch asked for."""


def first_line_of(error: Exception) -> str:
    """What a torch error says, in one line: 'Error(s) in loading state_dict for MoCo:' alone names nothing."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = "; ".join(lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])
    return detail if len(detail) <= 400 else detail[:400] + "..."


def describe(epoch: int, step: int, steps: int) -> str:
    return f"epoch {epoch}" if not step else f"{epoch} epochs and {step}/{steps} steps of epoch {epoch + 1}"


def train_state(epoch: int, step: int, loader, loss_sum: torch.Tensor, device: torch.device) -> dict:
    """This rank's part of a checkpoint cut inside an epoch: its RNGs, its loader's position, its loss so far."""
    cuda = device.type == "cuda"
    return dict(
        epoch=epoch,
        step=step,
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(device) if cuda else None,
        loader=loader.state_dict(),
        loss_sum=loss_sum,
    )


def restore_train_state(state: dict, loader, device: torch.device) -> torch.Tensor:
    """`train_state` put back: the RNGs and the loader as they were; returns the loss sum."""
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state["rng_cuda"] is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    loader.load_state_dict(state["loader"])
    return state["loss_sum"].to(device)


class Checkpoints:
    """One run's checkpoints. Rank 0 chooses, writes and reports; every rank knows the newest one (`last`: path,
    epoch, step of the newest on disk)."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, run_dir: RunDir):
        self.cfg, self.runtime, self.run_dir = cfg, runtime, run_dir
        self.writer = CheckpointWriter()
        self.last: tuple[Path, int, int] | None = None
        self.last_save_time = time.monotonic()
        self.changed: dict[str, tuple] = {}  # flag -> (the resumed checkpoint's value, this run's)

    # --- the one to go on from ---

    def open(self) -> tuple[Path | None, dict | None]:
        """Rank 0 locks the output folder and picks the checkpoint to go on from; every rank gets it, or the same
        one-line refusal. A checkpoint in this folder continues the run in it; a fresh run, or one from another
        folder's checkpoint, refuses a folder where an earlier run left anything."""
        path, refusal, loaded = None, None, None
        if self.runtime.is_main:
            try:
                self.run_dir.open()
                path, loaded = self.choose()
                if self.cfg.run.resume != "auto" and (path is None or not self.run_dir.holds(path)):
                    self.run_dir.refuse_overwrite()
            except (ConfigError, CheckpointError) as e:
                path, refusal = None, str(e)
        path, refusal = from_main((path, refusal), self.runtime)
        if refusal:
            raise ConfigError(refusal)
        if path is None:
            return None, None
        return path, loaded if self.runtime.is_main else load_checkpoint(path)

    def choose(self) -> tuple[Path | None, dict | None]:
        """--resume PATH, or for --resume auto the newest of this folder's checkpoints that loads (saying which
        ones it passed over), with the checkpoint read while choosing it."""
        resume = self.cfg.run.resume
        if resume != "auto":
            return (Path(resume), load_checkpoint(resume)) if resume else (None, None)
        passed_over = []
        for path in self.run_dir.checkpoints():
            try:
                loaded = load_checkpoint(path)
            except CheckpointError as e:
                passed_over.append(str(e))
                continue
            for reason in passed_over:
                console.print(f"notice: {reason}; resuming from {path} instead")
            return path, loaded
        if passed_over:
            raise CheckpointError(
                f"--resume auto: no checkpoint in {self.run_dir.path} loads ({'; '.join(passed_over)})"
                f"; remove them or choose another --out"
            )
        left = self.run_dir.earlier_run_files()
        if left:
            console.print(
                f"notice: --resume auto: {self.run_dir.path} holds no checkpoint, so the run starts afresh "
                f"and replaces its {' and '.join(left)}"
            )
        return None, None

    # --- resuming ---

    def restore(self, checkpoint: dict, path: Path, moco, optimizer, scaler) -> tuple[int, int, dict | None]:
        """Model, queue, optimizer and scaler from `checkpoint`; returns (epoch, step, this rank's RNG and loader
        state for a checkpoint cut inside an epoch, which only the same batch size, world size and data can use)."""
        cfg, runtime = self.cfg, self.runtime
        saved_cfg = checkpoint.get("config") or {}
        self.changed = changed_settings(saved_cfg, cfg)
        try:
            moco.load_state_dict(without_prefix(checkpoint["state_dict"]))
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {first_line_of(e)}") from None
        if "optimizer" in checkpoint:
            check_same_optimizer(saved_cfg.get("optim", {}).get("optimizer", "sgd"), cfg.optim.optimizer)
            try:
                optimizer.load_state_dict(checkpoint["optimizer"])
                lay_out_state_like_params(optimizer)
            except (KeyError, RuntimeError, ValueError) as e:
                raise CheckpointError(
                    f"checkpoint {path}: its optimizer state does not fit: {first_line_of(e)}"
                ) from None
        if scaler.is_enabled() and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])  # else (fp32/bf16 or official) a fresh one
        epoch, step = int(checkpoint["epoch"]), int(checkpoint.get("step", 0))
        if epoch >= cfg.run.epochs:
            raise NothingLeft(
                f"nothing left to train: {path} holds all {epoch} epochs of --epochs "
                f"{cfg.run.epochs} (raise --epochs to train longer)"
            )
        rank_state = None
        if step:
            cut = (checkpoint.get("batch_size"), checkpoint.get("world_size"))
            if cut != (cfg.optim.batch_size, runtime.world_size):
                raise CheckpointError(
                    f"checkpoint {path} was cut inside epoch {epoch + 1} by a run with batch "
                    f"{cut[0]} on {cut[1]} ranks; resume it with that --batch-size and world size, "
                    f"or from an epoch's checkpoint"
                )
            rank_state = checkpoint["ranks"][runtime.rank]
            fixed = {flag: values for flag, values in self.changed.items() if flag in FIXED_INSIDE_AN_EPOCH}
            if fixed:
                raise CheckpointError(
                    f"checkpoint {path} was cut inside epoch {epoch + 1}, whose remaining images "
                    f"follow from its "
                    + ", ".join(f"{flag} {was}" for flag, (was, _) in fixed.items())
                    + ": resume it with the same, or from an epoch's checkpoint"
                )
        self.last = (path, epoch, step)
        return epoch, step, rank_state

    def check_steps(self, checkpoint: dict, path: Path, steps: int) -> None:
        """A cut epoch goes on only with its step count; then rank 0 says where the run resumes and every setting
        that differs from the checkpoint's run."""
        _, epoch, step = self.last
        if step and checkpoint.get("steps_per_epoch") != steps:
            raise CheckpointError(
                f"checkpoint {path} was cut inside an epoch of {checkpoint.get('steps_per_epoch')} "
                f"steps, but this run's epochs have {steps}: resume it with the same data, "
                f"--batch-size and --max-steps, or from an epoch's checkpoint"
            )
        if self.runtime.is_main:
            if self.changed:
                console.print(
                    "notice: settings that differ from the checkpoint's run: "
                    + ", ".join(f"{flag} {now} (was {was})" for flag, (was, now) in self.changed.items())
                )
            console.print(f"resumed from {path} at epoch {epoch}" + (f", step {step}" if step else ""))

    # --- saving ---

    def save(
        self, parts: dict, epoch: int, step: int, steps: int, rank_state: dict | None, keep: bool, row: dict | None
    ) -> None:
        """checkpoint_last (and checkpoint_EPOCH when `keep`) of `parts` (model, optimizer, scaler: what has a
        state_dict) at (epoch, step), written in the background; the epoch's metrics `row` is appended once it is
        on disk, so that no row claims an epoch no checkpoint holds. Inside an epoch every rank's `rank_state`
        goes with it, gathered on rank 0."""
        cfg, runtime = self.cfg, self.runtime
        ranks = gather_on_main(to_host(rank_state), runtime) if step else None
        path, self.last_save_time = self.run_dir.last_checkpoint, time.monotonic()
        where = (path, epoch, step)
        if not runtime.is_main:
            self.last = where
            return
        state = dict(
            epoch=epoch,
            step=step,
            arch=cfg.model.arch,
            config=to_dict(cfg),
            steps_per_epoch=steps,
            batch_size=cfg.optim.batch_size,
            world_size=runtime.world_size,
            **{name: part.state_dict() for name, part in parts.items()},
        )
        state["state_dict"] = with_prefix(state["state_dict"])
        state = to_host(state)
        if ranks is not None:
            state["ranks"] = ranks
        self.writer.submit(
            state,
            path,
            *([self.run_dir.epoch_checkpoint(epoch)] if keep else []),
            then=functools.partial(self.written, where, row),
        )

    def written(self, where: tuple[Path, int, int], row: dict | None) -> None:
        """On the writer's thread, once the checkpoint at `where` is on disk."""
        self.last = where
        if row is not None:
            self.run_dir.append_metrics(row)

    def kept(self, steps: int) -> str:
        """The newest checkpoint, for a line that names it, once a write in progress has ended."""
        self.writer.wait()  # the newest is whole, or its failure is the error
        if self.last is None:
            return "no checkpoint had been written yet"
        return f"{self.last[0]} ({describe(*self.last[1:], steps)}) is the last good checkpoint"

    def interrupted_message(self, epoch: int, step: int, steps: int) -> str:
        """What a stop keeps: the newest checkpoint on disk, once a write in progress has ended; after a second
        signal, also the training (to `epoch`, `step`) it does not keep."""
        try:
            self.writer.wait()
            failure = ""
        except CheckpointError as e:
            failure = f"; {e}"
        lost = (
            ""
            if self.last and self.last[1:] == (epoch, step)
            else f" (the training to {describe(epoch, step, steps)} is not kept{failure})"
        )
        if self.last is None:
            return "interrupted before any checkpoint was written" + ("" if (epoch, step) == (0, 0) else lost)
        path, last_epoch, last_step = self.last
        return (
            f"interrupted: {path} holds {describe(last_epoch, last_step, steps)}; continue with --resume {path}" + lost
        )

"""The trainer: one object that owns a pretraining run's state (model, optimizer, scaler, loader position, RNGs,
step counters) and the loop over it.

    trainer = Trainer(cfg)   # checks every setting, joins the process group
    trainer.build()          # output folder, checkpoint, model, optimizer, step, then the data
    trainer.run()            # epochs: run_epoch, end_epoch; save when due; stop when asked

Nothing is lost. `checkpoint_last.pth.tar` is written at every epoch's end and, inside an epoch, every
--checkpoint-minutes / --checkpoint-steps, and when a stop signal arrives; it holds everything needed to go
on bit-exactly from that step (engine/checkpoint.py). The trainer reads the device only at its check-ins,
every --print-freq steps: there the ranks agree, in one small all-reduce, on whether to stop, whether a
checkpoint is due (rank 0's clock decides), and whether a loss has gone non-finite.
"""

from __future__ import annotations

import itertools
import time

import torch

from engine import distributed
from engine.builders import build_knn_monitor, build_model, build_step, build_train_loader
from engine.checkpoint import Checkpoints, restore_train_state, train_state
from engine.cli import loader_options, resolve, validate
from engine.config import TrainConfig
from engine.optim import build_optimizer, learning_rate, set_learning_rate
from engine.reporting import DataWait, Report
from engine.rundir import RunDir
from engine.signals import StopSignals
from engine.step import AMP_DTYPES
from model.checkpoint import CheckpointError
from pipeline.common import derive_seed


class TrainingDiverged(RuntimeError):
    """A loss went non-finite in a bf16/fp32 run: its weights are lost, the last checkpoint is not."""


class Interrupted(Exception):
    """A stop signal was honoured; the message says which checkpoint to continue from."""


class Trainer:
    """One run. `epoch` counts finished epochs and `step` the steps done in the next one: together, where the
    run is, which is what a checkpoint records and a resumed run starts from."""

    # Built by build(): the MoCo module (whose state checkpoints hold), what the step calls (it, or its DDP
    # wrapper), the optimizer, the step (MocoStep or GraphedStep), the --loader, the kNN monitor (or None).
    moco: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_step: object
    loader: object
    knn: object
    steps: int = 0  # per epoch
    # Set by run_epoch(): the loss so far, the lr, where the epoch (re)started, and what it measures.
    loss_sum: torch.Tensor
    lr: float
    first_step: int
    counter_at_first_step: int
    skipped_before: int
    epoch_start_time: float
    data_wait: DataWait

    def __init__(self, cfg: TrainConfig):
        device = distributed.pick_device(cfg.run.device)
        validate(cfg, distributed.world_size_from_env(), device.type)
        self.cfg = cfg = resolve(cfg, distributed.world_size_from_env(), device)
        distributed.refuse_hanging_restarts()
        self.owns_process_group = distributed.world_size_from_env() > 1 and not torch.distributed.is_initialized()
        self.runtime = distributed.init_runtime(device, cfg.run.dist_timeout_minutes)
        self.precision = cfg.step.precision
        self.amp_dtype = AMP_DTYPES[self.precision]
        self.run_dir = RunDir(cfg.run.out)
        self.checkpoints = Checkpoints(cfg, self.runtime, self.run_dir)
        self.signals = StopSignals(
            second_signal_stops_at_once=self.runtime.world_size == 1, announce=self.runtime.is_main
        )
        self.report = Report(self.runtime.is_main, cfg.run.epochs)
        self.epoch, self.step = 0, 0
        self.resumed = False
        self.rank_state: dict | None = None  # this rank's part of a mid-epoch checkpoint, until the epoch starts

    def build(self) -> None:
        """Everything the run needs, cheapest checks first: output folder and checkpoint, then model, optimizer and
        step, and only then the data (building a loader scans the dataset)."""
        cfg, runtime = self.cfg, self.runtime
        path, checkpoint = self.checkpoints.open()
        self.moco, self.model = build_model(cfg, runtime)
        self.optimizer = build_optimizer(cfg.optim, self.moco.parameters())
        self.train_step = build_step(cfg, runtime, self.model, self.optimizer, self.precision)
        if checkpoint is not None:
            self.epoch, self.step, self.rank_state = self.checkpoints.restore(
                checkpoint, path, self.moco, self.optimizer, self.train_step.scaler
            )
            self.resumed = True
        self.loader = build_train_loader(
            cfg, runtime, self.amp_dtype or torch.float32, loader_options(cfg), synthetic_steps=cfg.run.max_steps or 100
        )
        self.steps = min(len(self.loader), cfg.run.max_steps or len(self.loader))
        if checkpoint is not None:
            self.checkpoints.check_steps(checkpoint, path, self.steps)
        self.knn = build_knn_monitor(cfg, runtime, self.amp_dtype)
        if runtime.is_main:
            self.run_dir.restart_metrics(self.epoch if self.resumed else None)
            self.report.open(self.run_dir.path / "tb", self.global_step if self.resumed else None)

    # --- the run ---

    def run(self) -> dict:
        """Trains until --epochs; returns the metrics rows. Raises Interrupted after a stop signal (a checkpoint
        written), TrainingDiverged on a non-finite loss (none written)."""
        cfg, runtime = self.cfg, self.runtime
        with self.signals, self.report.progress:
            try:
                if not self.resumed:
                    self.evaluate_init()
                    self.stop_if_asked(save=True)  # a signal during the random init's kNN pass: no step trained
                self.report.say(
                    f"MoCo {cfg.model.arch} | loader {cfg.data.loader} | {runtime.device} "
                    f"x{runtime.world_size} | {self.precision} | batch {cfg.optim.batch_size} | "
                    f"K {cfg.model.moco_k} | {self.steps} steps/epoch"
                )
                while self.epoch < cfg.run.epochs:
                    self.run_epoch()
                    self.end_epoch()
            except BaseException:
                self.report.progress.live.transient = True  # the last line says why it stopped, no half bar after
                raise
        self.checkpoints.writer.wait()
        rows = self.run_dir.rows() if runtime.is_main else []
        self.report.summary(rows)
        return {"rows": rows}

    def close(self) -> None:
        """Waits for a checkpoint still being written, unlocks the output folder, leaves the process group it
        joined."""
        try:
            self.checkpoints.writer.wait()
        finally:
            self.report.close()
            self.run_dir.close()
            if self.owns_process_group:
                distributed.shutdown()

    def evaluate_init(self) -> None:
        knn = self.knn(self.moco.encoder_q) if self.knn else None
        if self.runtime.is_main:
            self.run_dir.append_metrics(dict(epoch=0, loss=None, knn_top1=knn, img_per_s=None, lr=None))
        self.report.init_knn(knn)

    def run_epoch(self) -> None:
        """The steps of epoch `epoch` from step `step` on. Every random draw of the epoch (the shuffle-BN
        permutations) follows from (seed, epoch, rank), or from the checkpoint's saved state mid-epoch."""
        cfg, device, start = self.cfg, self.runtime.device, self.step
        self.loader.set_epoch(self.epoch, start)
        if self.rank_state is None:
            torch.manual_seed(derive_seed(cfg.run.seed, self.epoch, self.runtime.rank))
            self.loss_sum = torch.zeros((), device=device)
        else:
            self.loss_sum = restore_train_state(self.rank_state, self.loader, device)
            self.rank_state = None
        self.skipped_before = int(self.train_step.counters.skipped)
        self.first_step, self.counter_at_first_step = start, int(self.train_step.counters.steps)
        self.report.start_epoch(self.epoch, self.steps, start)
        self.epoch_start_time, self.lr, self.data_wait = time.perf_counter(), 0.0, DataWait(self.loader)
        batches = itertools.islice(self.data_wait, self.steps - start)  # --max-steps: no batch more
        for i, (im_q, im_k, _) in enumerate(batches, start=start):
            self.lr = learning_rate(cfg.optim, self.epoch + i / self.steps, cfg.run.epochs)
            set_learning_rate(self.optimizer, self.lr)
            self.loss_sum += self.train_step(im_q, im_k)
            self.step = i + 1
            if self.check_in_due():
                self.check_in()

    @property
    def global_step(self) -> int:
        """Steps since the run began: TensorBoard's x axis and --checkpoint-steps' count."""
        return self.epoch * self.steps + self.step

    def checkpoint_steps_due(self) -> bool:
        return self.cfg.run.checkpoint_steps > 0 and self.global_step % self.cfg.run.checkpoint_steps == 0

    def check_in_due(self) -> bool:
        return (
            self.step % self.cfg.run.print_freq == 0
            or self.step == self.steps
            or self.checkpoint_steps_due()
            or (self.runtime.world_size == 1 and self.signals.requested)
        )

    def check_in(self) -> None:
        """Reads the device once: the ranks agree on stopping and checkpointing, a non-finite loss is caught
        before any checkpoint could keep it, and the progress bar moves. At the epoch's last step the epoch's
        end does the saving and stopping."""
        r, counters, writer = self.cfg.run, self.train_step.counters, self.checkpoints.writer
        time_due = (
            self.runtime.is_main
            and r.checkpoint_minutes > 0
            and time.monotonic() - self.checkpoints.last_save_time >= 60 * r.checkpoint_minutes
        )
        diverging = not self.train_step.scaler.is_enabled()  # fp16: the GradScaler skips such steps instead
        host_flags = [self.signals.requested, time_due, self.runtime.is_main and writer.failed()]
        flags = torch.cat(
            [
                torch.tensor([int(f) for f in host_flags], device=counters.steps.device),
                torch.stack([counters.nonfinite * int(diverging), -counters.first_nonfinite]),
            ]
        )
        stop, due, write_failed, nonfinite, first_nonfinite = distributed.max_over_ranks(flags, self.runtime)
        if nonfinite:
            self.diverged(-first_nonfinite)
        if write_failed:
            self.write_failed()
        if self.runtime.is_main:
            loss, elapsed = float(self.loss_sum) / self.step, time.perf_counter() - self.epoch_start_time
            img_s = (self.step - self.first_step) * self.cfg.optim.batch_size / elapsed
            self.report.check_in(self.epoch, self.step, self.steps, self.global_step, loss, img_s, self.lr)
        if self.step == self.steps:
            return
        if due or self.checkpoint_steps_due() or stop:
            self.save()
        if stop:
            self.stop()

    def diverged(self, first_nonfinite: int) -> None:
        step = self.first_step + first_nonfinite - self.counter_at_first_step + 1
        kept = self.checkpoints.kept(self.steps)
        raise TrainingDiverged(
            f"the loss became non-finite at epoch {self.epoch + 1}, step {step} (lr {self.lr:.4g}); "
            f"stopped without saving the diverged weights: {kept}"
        )

    def end_epoch(self) -> None:
        """Mean loss over the ranks, the kNN monitor when due, a metrics row, the epoch's checkpoint; then a
        stop asked for during the epoch's end is honoured, with nothing left to lose."""
        cfg, runtime = self.cfg, self.runtime
        if runtime.world_size > 1:
            torch.distributed.all_reduce(self.loss_sum)
            self.loss_sum /= runtime.world_size
        elapsed = time.perf_counter() - self.epoch_start_time
        row = dict(
            epoch=self.epoch + 1,
            loss=float(self.loss_sum) / self.steps,
            knn_top1=None,
            img_per_s=(self.steps - self.first_step) * cfg.optim.batch_size / elapsed,
            lr=self.lr,
            skipped_steps=int(self.train_step.counters.skipped) - self.skipped_before,
            data_wait=self.data_wait.seconds / elapsed,
        )
        self.epoch, self.step = self.epoch + 1, 0
        last = self.epoch == cfg.run.epochs
        if self.knn and (self.epoch % cfg.run.knn_every == 0 or last):
            row["knn_top1"] = self.knn(self.moco.encoder_q)
        self.report.end_epoch(row, self.global_step, runtime.device)
        self.save(keep=self.epoch % cfg.run.save_every == 0 or last, row=row)
        if not last:
            self.stop_if_asked(save=False)  # the epoch's checkpoint is being written

    def stop_if_asked(self, save: bool) -> None:
        """Between epochs (and after the random init's kNN pass): a stop asked for on any rank, honoured with a
        checkpoint of where the run is."""
        flags = torch.tensor([int(self.signals.requested)], device=self.runtime.device)
        if distributed.max_over_ranks(flags, self.runtime)[0]:
            if save:
                self.save()
            self.stop()

    # --- checkpoints ---

    def save(self, keep: bool = False, row: dict | None = None) -> None:
        """checkpoint_last (and checkpoint_EPOCH when `keep`) of where the run is now, with the epoch's metrics
        `row` once it is on disk. A second signal waits until the checkpoint is handed to its writer."""
        parts = {"state_dict": self.moco, "optimizer": self.optimizer}
        if self.train_step.scaler.is_enabled():
            parts["scaler"] = self.train_step.scaler
        with self.signals.deferred():  # the loader's and the RNGs' state too are part of what it keeps
            where = (self.epoch, self.step)
            rank_state = train_state(*where, self.loader, self.loss_sum, self.runtime.device) if self.step else None
            self.checkpoints.save(parts, *where, self.steps, rank_state, keep, row)

    def write_failed(self) -> None:
        """Every rank stops on rank 0's failed checkpoint write, learnt at a check-in, not rank 0 alone."""
        self.checkpoints.writer.wait()  # rank 0: raises the write's own error
        raise CheckpointError("rank 0 could not write its checkpoint; its log says why")

    def stop(self) -> None:
        """Every rank leaves together once rank 0's checkpoint is on disk: a rank that left first would have the
        launcher end the others, the writer among them. A second signal lets the write finish (an interrupted
        join would leave the writer's thread to the interpreter's exit)."""
        with self.signals.deferred():
            failed = self.runtime.is_main and self.checkpoints.writer.failed(wait=True)
        if distributed.max_over_ranks(torch.tensor([int(failed)], device=self.runtime.device), self.runtime)[0]:
            self.write_failed()
        raise Interrupted(self.interrupted_message())

    def interrupted_message(self) -> str:
        return self.checkpoints.interrupted_message(self.epoch, self.step, self.steps)

"""The trainer: one object that owns a pretraining run's state (model, optimizer, scaler, loader position, RNGs,
step counters) and the loop over it.

    trainer = Trainer(cfg)   # checks every setting, joins the process group
    trainer.build()          # output folder, checkpoint, model, optimizer, step, then the data
    trainer.run()            # epochs: run_epoch, end_epoch; save when due; stop when asked

Nothing is lost. `checkpoint_last.pth.tar` is written at every epoch's end and, inside an epoch, every
--checkpoint-minutes / --checkpoint-steps, and when a stop signal arrives; it holds everything needed to go
on bit-exactly from that step (see engine/checkpoint.py). The trainer reads the device only at its check-ins,
every --print-freq steps: there the ranks agree, in one small all-reduce, on whether to stop, whether a
checkpoint is due (rank 0's clock decides), and whether a loss has gone non-finite.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from engine.checkpoint import CheckpointError, CheckpointWriter, load_checkpoint, to_host, with_prefix, without_prefix
from engine.config import ConfigError, TrainConfig, changed_settings, loader_options, to_dict, validate
from engine.cuda_graph import GraphedStep
from engine.distributed import (Runtime, from_main, gather_on_main, init_runtime, max_over_ranks, pick_device,
                                refuse_hanging_restarts, shutdown, world_size_from_env)
from engine.optim import (build_optimizer, check_same_optimizer, lay_out_state_like_params, learning_rate,
                          set_learning_rate)
from engine.rundir import RunDir
from engine.scalars import Scalars, peak_device_mb, peak_host_rss_mb
from engine.signals import StopSignals
from engine.step import AMP_DTYPES, MocoStep, resolve_precision
from evaluation.data import build_eval_loader
from evaluation.knn import KnnMonitor, labelled_data
from model import MoCo, build_encoder
from model.moco import no_stage
from pipeline import build_loader
from pipeline.common import derive_seed
from pipeline.errors import DataError

console = Console(stderr=True, soft_wrap=True)

# What decides which images the rest of an epoch sees, and in what order: fixed inside an epoch.
FIXED_INSIDE_AN_EPOCH = ("--data", "--loader", "--loader-option", "--seed")


class TrainingDiverged(RuntimeError):
    """A loss went non-finite in a bf16/fp32 run: its weights are lost, the last checkpoint is not."""


class Interrupted(Exception):
    """A stop signal was honoured; the message says which checkpoint to continue from."""


def build_model(cfg: TrainConfig, runtime: Runtime):
    """The MoCo module and what the step calls: the module itself, or its DDP wrapper under torchrun."""
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    moco = MoCo(functools.partial(build_encoder, m.arch), dim=m.moco_dim, K=m.moco_k, m=m.moco_m, T=m.moco_t,
                mlp=m.mlp, shuffle=m.shuffle, bn_splits=m.bn_splits)
    moco = moco.to(runtime.device, memory_format=memory_format(cfg))
    if cfg.step.compile:  # in place: the state-dict keys stay those of the official layout
        moco.encoder_q.compile()
        moco.encoder_k.compile()
    if runtime.world_size == 1:
        return moco, moco
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # Ranks keep their own query-encoder BN buffers: broadcasting them, and the 32 MB queue, every step
    # buys nothing (the queues are identical by construction). torch 2.14 renamed the switch.
    ddp_init = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_init else {"broadcast_buffers": False}
    ddp = torch.nn.parallel.DistributedDataParallel(moco, device_ids=device_ids, **no_sync)
    return moco, ddp


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.step.channels_last else torch.contiguous_format


def build_step(cfg: TrainConfig, runtime: Runtime, model, optimizer, precision: str, stage=no_stage
               ) -> MocoStep | GraphedStep:
    """The step `cfg.step` describes: the one code path for train.py and every benchmark."""
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.step.cudnn_benchmark
    step = MocoStep(model, optimizer, precision, runtime.device, cfg.step.fused_loss, stage, memory_format(cfg))
    return GraphedStep(step) if cfg.step.cuda_graphs else step


def build_knn_monitor(cfg: TrainConfig, runtime: Runtime, amp_dtype) -> KnnMonitor | None:
    """The kNN monitor over the labelled data, or None (with a notice) when there is none."""
    r = cfg.run
    data = labelled_data(cfg.data.data, cfg.data.loader, cfg.data.knn_data)
    if r.knn_every <= 0:
        return None
    if data is None:
        if runtime.is_main:
            console.print("notice: no labelled data for the kNN monitor (give --knn-data); it is off")
        return None
    common = dict(image_size=cfg.data.image_size, batch_size=max(256, cfg.optim.batch_size // runtime.world_size),
                  device=runtime.device, dtype=amp_dtype or torch.float32, num_workers=cfg.data.workers, seed=r.seed,
                  rank=runtime.rank, world_size=runtime.world_size)
    bank = build_eval_loader(data, "train", max_samples=r.knn_train_samples, **common)
    try:
        val = build_eval_loader(data, "val", max_samples=r.knn_val_samples, **common)
    except DataError as e:
        if runtime.is_main:
            console.print(f"notice: kNN monitor off: {e}")
        return None
    return KnnMonitor(bank, val, amp_dtype, k=r.knn_k, t=r.knn_t)


LOG_LINE_EVERY_S = 60.0  # where stderr is a file (a scheduler's log), a progress line at most this often


def progress_bar(enabled: bool) -> Progress:
    """A live bar on a terminal; where stderr is a file the trainer writes plain lines instead (a bar would only
    be drawn once, at the end)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[img_s]:,.0f} img/s  lr {task.fields[lr]:.4g}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not (enabled and console.is_terminal),
    )


def first_line_of(error: Exception) -> str:
    """What a torch error says, in one line: 'Error(s) in loading state_dict for MoCo:' alone names nothing."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = "; ".join(lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])
    return detail if len(detail) <= 400 else detail[:400] + "..."


class Trainer:
    """One run. `epoch` counts finished epochs and `step` the steps done in the next one: together, where the
    run is, which is what a checkpoint records and a resumed run starts from."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        device = pick_device(cfg.run.device)
        validate(cfg, world_size_from_env(), device.type)
        refuse_hanging_restarts()
        self.owns_process_group = world_size_from_env() > 1 and not torch.distributed.is_initialized()
        self.runtime = init_runtime(device, cfg.run.dist_timeout_minutes)
        self.precision = resolve_precision(cfg.step.precision, device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        self.run_dir = RunDir(cfg.run.out)
        self.writer = CheckpointWriter()
        self.signals = StopSignals(second_signal_stops_at_once=self.runtime.world_size == 1,
                                   announce=self.runtime.is_main)
        self.progress = progress_bar(self.runtime.is_main)
        self.epoch, self.step = 0, 0
        self.resumed_from: Path | None = None
        self.loaded: dict | None = None  # rank 0's checkpoint, read once while choosing it
        self.rank_state: dict | None = None  # this rank's part of a mid-epoch checkpoint, until the epoch starts
        self.last_checkpoint: tuple[Path, int, int] | None = None  # (path, epoch, step) of the newest one on disk
        self.last_save_time = self.last_log_line = time.monotonic()
        self.scalars = Scalars(None)  # rank 0's writes to OUT/tb once built

    # --- build and resume ---

    def open_run_dir(self) -> tuple[Path | None, str | None]:
        """Rank 0 locks the output folder and picks the checkpoint to go on from: (its path or None, why the run
        cannot start or None). A checkpoint in this folder continues the run in it; a fresh run, or one from
        another folder's checkpoint, refuses a folder where an earlier run left anything."""
        try:
            self.run_dir.open()
            path = self.checkpoint_to_resume()
            if self.cfg.run.resume != "auto" and (path is None or not self.run_dir.holds(path)):
                self.run_dir.refuse_overwrite()
        except (ConfigError, CheckpointError) as e:
            return None, str(e)
        return path, None

    def checkpoint_to_resume(self) -> Path | None:
        """--resume PATH, or for --resume auto the newest of this folder's checkpoints that loads (saying which
        ones it passed over); rank 0 keeps the one it loaded in `loaded`."""
        resume = self.cfg.run.resume
        if resume != "auto":
            if resume:
                self.loaded = load_checkpoint(resume)
            return Path(resume) if resume else None
        passed_over = []
        for path in self.run_dir.checkpoints():
            try:
                self.loaded = load_checkpoint(path)
            except CheckpointError as e:
                passed_over.append(str(e))
                continue
            for reason in passed_over:
                console.print(f"notice: {reason}; resuming from {path} instead")
            return path
        if passed_over:
            raise CheckpointError(f"--resume auto: no checkpoint in {self.run_dir.path} loads ({'; '.join(passed_over)})"
                                  f"; remove them or choose another --out")
        left = self.run_dir.earlier_run_files()
        if left:
            console.print(f"notice: --resume auto: {self.run_dir.path} holds no checkpoint, so the run starts afresh "
                          f"and replaces its {' and '.join(left)}")
        return None

    def build(self) -> None:
        """Everything the run needs, cheapest checks first: output folder and checkpoint, then model, optimizer and
        step, and only then the data (building a loader scans the dataset)."""
        cfg, runtime = self.cfg, self.runtime
        path, refusal = self.open_run_dir() if runtime.is_main else (None, None)
        path, refusal = from_main((path, refusal), runtime)  # every rank fails alike, or goes on alike
        if refusal:
            raise ConfigError(refusal)
        checkpoint = (self.loaded if runtime.is_main else load_checkpoint(path)) if path else None
        self.loaded = None
        self.moco, self.model = build_model(cfg, runtime)
        self.optimizer = build_optimizer(cfg.optim, self.moco.parameters())
        self.train_step = build_step(cfg, runtime, self.model, self.optimizer, self.precision)
        if checkpoint is not None:
            self.resume(checkpoint, path)
        options = ({"steps": cfg.run.max_steps or 100} if cfg.data.loader == "synthetic"
                   else {"num_workers": cfg.data.workers, **loader_options(cfg)})
        self.loader = build_loader(
            cfg.data.loader, cfg.data.data, batch_size=cfg.optim.batch_size // runtime.world_size,
            image_size=cfg.data.image_size, device=runtime.device, aug=cfg.data.aug, rank=runtime.rank,
            world_size=runtime.world_size, seed=cfg.run.seed, dtype=self.amp_dtype or torch.float32, **options)
        self.steps = min(len(self.loader), cfg.run.max_steps or len(self.loader))
        if checkpoint is not None and self.step and checkpoint.get("steps_per_epoch") != self.steps:
            raise CheckpointError(f"checkpoint {path} was cut inside an epoch of {checkpoint.get('steps_per_epoch')} "
                                  f"steps, but this run's epochs have {self.steps}: resume it with the same data, "
                                  f"--batch-size and --max-steps, or from an epoch's checkpoint")
        if checkpoint is not None and runtime.is_main:
            self.say_resumed(checkpoint, path)
        self.knn = build_knn_monitor(cfg, runtime, self.amp_dtype)
        if runtime.is_main:
            self.run_dir.restart_metrics(self.epoch if checkpoint is not None else None)
            self.scalars = Scalars(self.run_dir.path / "tb", resume_step=self.global_step if checkpoint is not None
                                   else None)

    def resume(self, checkpoint: dict, path: Path) -> None:
        """Model, queue, optimizer, scaler and position from `checkpoint`; for one cut inside an epoch, also this
        rank's RNG and loader state, which only the same batch size and world size can use."""
        cfg, runtime = self.cfg, self.runtime
        saved_cfg = checkpoint.get("config") or {}
        try:
            self.moco.load_state_dict(without_prefix(checkpoint["state_dict"]))
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {first_line_of(e)}") from None
        if "optimizer" in checkpoint:
            check_same_optimizer(saved_cfg.get("optim", {}).get("optimizer", "sgd"), cfg.optim.optimizer)
            try:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
                lay_out_state_like_params(self.optimizer)
            except (KeyError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit: {first_line_of(e)}") \
                    from None
        if self.train_step.scaler.is_enabled() and checkpoint.get("scaler"):
            self.train_step.scaler.load_state_dict(checkpoint["scaler"])  # else (fp32/bf16 or official) a fresh one
        self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint.get("step", 0))
        if self.epoch >= cfg.run.epochs:
            raise NothingLeft(f"nothing left to train: {path} holds all {self.epoch} epochs of --epochs "
                              f"{cfg.run.epochs} (raise --epochs to train longer)")
        if self.step:
            cut = (checkpoint.get("batch_size"), checkpoint.get("world_size"))
            if cut != (cfg.optim.batch_size, runtime.world_size):
                raise CheckpointError(f"checkpoint {path} was cut inside epoch {self.epoch + 1} by a run with batch "
                                      f"{cut[0]} on {cut[1]} ranks; resume it with that --batch-size and world size, "
                                      f"or from an epoch's checkpoint")
            self.rank_state = checkpoint["ranks"][runtime.rank]
            fixed = {flag: values for flag, values in changed_settings(saved_cfg, cfg).items()
                     if flag in FIXED_INSIDE_AN_EPOCH}
            if fixed:
                raise CheckpointError(f"checkpoint {path} was cut inside epoch {self.epoch + 1}, whose remaining images "
                                      f"follow from its " + ", ".join(f"{flag} {was}" for flag, (was, _) in fixed.items())
                                      + ": resume it with the same, or from an epoch's checkpoint")
        self.resumed_from = path
        self.last_checkpoint = (path, self.epoch, self.step)

    def say_resumed(self, checkpoint: dict, path: Path) -> None:
        """Where the run goes on from, and every setting that differs from the checkpoint's run."""
        changed = changed_settings(checkpoint.get("config") or {}, self.cfg)
        if changed:
            console.print("notice: settings that differ from the checkpoint's run: "
                          + ", ".join(f"{flag} {now} (was {was})" for flag, (was, now) in changed.items()))
        where = f"epoch {self.epoch}" + (f", step {self.step}" if self.step else "")
        console.print(f"resumed from {path} at {where}")

    # --- the run ---

    def run(self) -> dict:
        """Trains until --epochs; returns the metrics rows. Raises Interrupted after a stop signal (a checkpoint
        written), TrainingDiverged on a non-finite loss (none written)."""
        cfg, runtime = self.cfg, self.runtime
        with self.signals, self.progress:
            try:
                if self.resumed_from is None:
                    self.evaluate_init()
                    self.stop_if_asked(save=True)  # a signal during the random init's kNN pass: no step trained
                if runtime.is_main:
                    console.print(f"MoCo {cfg.model.arch} | loader {cfg.data.loader} | {runtime.device} "
                                  f"x{runtime.world_size} | {self.precision} | batch {cfg.optim.batch_size} | "
                                  f"K {cfg.model.moco_k} | {self.steps} steps/epoch")
                while self.epoch < cfg.run.epochs:
                    self.run_epoch()
                    self.end_epoch()
            except BaseException:
                self.progress.live.transient = True  # the last line says why it stopped, no half bar after it
                raise
        self.writer.wait()
        rows = self.run_dir.rows() if runtime.is_main else []
        knn_rows = [r for r in rows if r["knn_top1"] is not None]
        if len(knn_rows) >= 2:
            console.print(f"kNN top-1: {knn_rows[0]['knn_top1']:.2f}% at epoch {knn_rows[0]['epoch']} -> "
                          f"{knn_rows[-1]['knn_top1']:.2f}% at epoch {knn_rows[-1]['epoch']}")
        return {"rows": rows}

    def close(self) -> None:
        """Waits for a checkpoint still being written, unlocks the output folder, leaves the process group it
        joined."""
        try:
            self.writer.wait()
        finally:
            self.scalars.close()
            self.run_dir.close()
            if self.owns_process_group:
                shutdown()

    def evaluate_init(self) -> None:
        knn = self.knn(self.moco.encoder_q) if self.knn else None
        if self.runtime.is_main:
            self.run_dir.append_metrics(dict(epoch=0, loss=None, knn_top1=knn, img_per_s=None, lr=None))
            self.scalars.add(0, **{"epoch/knn_top1": knn})
            if knn is not None:
                console.print(f"epoch 0 (random init): kNN top-1 {knn:.2f}%")

    def run_epoch(self) -> None:
        """The steps of epoch `epoch` from step `step` on. Every random draw of the epoch (the shuffle-BN
        permutations) follows from (seed, epoch, rank), or from the checkpoint's saved state mid-epoch."""
        cfg, device, start = self.cfg, self.runtime.device, self.step
        self.loader.set_epoch(self.epoch, start)
        if self.rank_state is None:
            torch.manual_seed(derive_seed(cfg.run.seed, self.epoch, self.runtime.rank))
            self.loss_sum = torch.zeros((), device=device)
        else:
            state, self.rank_state = self.rank_state, None
            torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda" and state["rng_cuda"] is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            self.loader.load_state_dict(state["loader"])
            self.loss_sum = state["loss_sum"].to(device)
        self.skipped_before = int(self.train_step.counters.skipped)
        self.first_step, self.counter_at_first_step = start, int(self.train_step.counters.steps)
        self.task = self.progress.add_task(f"epoch {self.epoch + 1}/{cfg.run.epochs}", total=self.steps,
                                           completed=start, loss=float("nan"), img_s=0.0, lr=0.0)
        self.epoch_start_time, self.lr, self.data_wait_s = time.perf_counter(), 0.0, 0.0
        batches = itertools.islice(self.waiting_for(self.loader), self.steps - start)  # --max-steps: no batch more
        for i, (im_q, im_k, _) in enumerate(batches, start=start):
            self.lr = learning_rate(cfg.optim, self.epoch + i / self.steps, cfg.run.epochs)
            set_learning_rate(self.optimizer, self.lr)
            self.loss_sum += self.train_step(im_q, im_k)
            self.step = i + 1
            if self.check_in_due():
                self.check_in()

    def waiting_for(self, loader):
        """The loader's batches, adding up the host time spent blocked in it: the loop waiting for data. No device
        sync is added: on a GPU the host runs ahead of the queued steps, so it only blocks here when the loader
        is behind."""
        batches = iter(loader)
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                self.data_wait_s += time.perf_counter() - start
                yield batch
        finally:
            if hasattr(batches, "close"):
                batches.close()

    @property
    def global_step(self) -> int:
        """Steps since the run began: TensorBoard's x axis and --checkpoint-steps' count."""
        return self.epoch * self.steps + self.step

    def checkpoint_steps_due(self) -> bool:
        return self.cfg.run.checkpoint_steps > 0 and self.global_step % self.cfg.run.checkpoint_steps == 0

    def check_in_due(self) -> bool:
        return (self.step % self.cfg.run.print_freq == 0 or self.step == self.steps or self.checkpoint_steps_due()
                or (self.runtime.world_size == 1 and self.signals.requested))

    def check_in(self) -> None:
        """Reads the device once: the ranks agree on stopping and checkpointing, a non-finite loss is caught
        before any checkpoint could keep it, and the progress bar moves. At the epoch's last step the epoch's
        end does the saving and stopping."""
        r, counters = self.cfg.run, self.train_step.counters
        time_due = (self.runtime.is_main and r.checkpoint_minutes > 0
                    and time.monotonic() - self.last_save_time >= 60 * r.checkpoint_minutes)
        diverging = not self.train_step.scaler.is_enabled()  # fp16: the GradScaler skips such steps instead
        host_flags = [self.signals.requested, time_due, self.runtime.is_main and self.writer.failed()]
        flags = torch.cat([torch.tensor([int(f) for f in host_flags], device=counters.steps.device),
                           torch.stack([counters.nonfinite * int(diverging), -counters.first_nonfinite])])
        stop, due, write_failed, nonfinite, first_nonfinite = max_over_ranks(flags, self.runtime)
        if nonfinite:
            self.diverged(-first_nonfinite)
        if write_failed:
            self.write_failed()
        if self.runtime.is_main:
            img_s = (self.step - self.first_step) * self.cfg.optim.batch_size / (time.perf_counter()
                                                                                 - self.epoch_start_time)
            loss = float(self.loss_sum) / self.step
            self.progress.update(self.task, completed=self.step, loss=loss, img_s=img_s, lr=self.lr)
            self.scalars.add(self.global_step, **{"train/loss": loss, "train/lr": self.lr, "train/img_per_s": img_s})
            if not console.is_terminal and time.monotonic() - self.last_log_line >= LOG_LINE_EVERY_S:
                self.last_log_line = time.monotonic()
                console.print(f"epoch {self.epoch + 1}/{self.cfg.run.epochs} step {self.step}/{self.steps}: "
                              f"loss {loss:.4f}  {img_s:,.0f} img/s  lr {self.lr:.4g}")
        if self.step == self.steps:
            return
        if due or self.checkpoint_steps_due() or stop:
            self.save()
        if stop:
            self.stop()

    def diverged(self, first_nonfinite: int) -> None:
        self.writer.wait()  # the last checkpoint is whole (or its failure is the error) before it is named
        step = self.first_step + first_nonfinite - self.counter_at_first_step + 1
        kept = (f"{self.last_checkpoint[0]} ({self.describe(*self.last_checkpoint[1:])}) is the last good checkpoint"
                if self.last_checkpoint else "no checkpoint had been written yet")
        raise TrainingDiverged(f"the loss became non-finite at epoch {self.epoch + 1}, step {step} (lr {self.lr:.4g}); "
                               f"stopped without saving the diverged weights: {kept}")

    def end_epoch(self) -> None:
        """Mean loss over the ranks, the kNN monitor when due, a metrics row, the epoch's checkpoint; then a
        stop asked for during the epoch's end is honoured, with nothing left to lose."""
        cfg, runtime = self.cfg, self.runtime
        if runtime.world_size > 1:
            torch.distributed.all_reduce(self.loss_sum)
            self.loss_sum /= runtime.world_size
        loss = float(self.loss_sum) / self.steps
        elapsed = time.perf_counter() - self.epoch_start_time
        img_s = (self.steps - self.first_step) * cfg.optim.batch_size / elapsed
        data_wait = self.data_wait_s / elapsed
        skipped = int(self.train_step.counters.skipped) - self.skipped_before
        self.epoch, self.step = self.epoch + 1, 0
        last = self.epoch == cfg.run.epochs
        knn = (self.knn(self.moco.encoder_q)
               if self.knn and (self.epoch % cfg.run.knn_every == 0 or last) else None)
        row = dict(epoch=self.epoch, loss=loss, knn_top1=knn, img_per_s=img_s, lr=self.lr, skipped_steps=skipped,
                   data_wait=data_wait)
        if runtime.is_main:
            self.scalars.add(self.global_step, **{"epoch/loss": loss, "epoch/knn_top1": knn, "epoch/img_per_s": img_s,
                                            "epoch/data_wait_fraction": data_wait, "epoch/lr": self.lr,
                                            "epoch/peak_device_mb": peak_device_mb(runtime.device),
                                            "epoch/peak_host_rss_mb": peak_host_rss_mb()})
            self.scalars.flush()
            self.progress.console.print(f"epoch {self.epoch}: loss {loss:.4f}  {img_s:,.0f} img/s  "
                                        f"waiting for data {100 * data_wait:.0f}%"
                                        + (f"  kNN top-1 {knn:.2f}%" if knn is not None else "")
                                        + (f"  ({skipped} steps skipped by the fp16 GradScaler: non-finite "
                                           f"gradients)" if skipped else ""))
        self.save(keep=self.epoch % cfg.run.save_every == 0 or last, row=row)
        if not last:
            self.stop_if_asked(save=False)  # the epoch's checkpoint is being written

    def stop_if_asked(self, save: bool) -> None:
        """Between epochs (and after the random init's kNN pass): a stop asked for on any rank, honoured with a
        checkpoint of where the run is."""
        flags = torch.tensor([int(self.signals.requested)], device=self.runtime.device)
        if max_over_ranks(flags, self.runtime)[0]:
            if save:
                self.save()
            self.stop()

    # --- checkpoints ---

    def save(self, keep: bool = False, row: dict | None = None) -> None:
        """checkpoint_last (and checkpoint_EPOCH when `keep`) of where the run is now, written in the background;
        the epoch's metrics `row` is appended once it is on disk, so no row claims an epoch that no checkpoint
        holds. Inside an epoch every rank's RNG, loader state and loss sum go with it, gathered on rank 0. A
        second signal waits until the checkpoint is handed to the writer, which finishes it."""
        with self.signals.deferred():
            self.hand_to_writer(keep, row)

    def hand_to_writer(self, keep: bool, row: dict | None) -> None:
        cfg, runtime = self.cfg, self.runtime
        ranks = None
        if self.step:
            cuda = runtime.device.type == "cuda"
            rank_state = dict(epoch=self.epoch, step=self.step, rng_cpu=torch.get_rng_state(),
                              rng_cuda=torch.cuda.get_rng_state(runtime.device) if cuda else None,
                              loader=self.loader.state_dict(), loss_sum=self.loss_sum)
            ranks = gather_on_main(to_host(rank_state), runtime)
        path, self.last_save_time = self.run_dir.last_checkpoint, time.monotonic()
        where = (path, self.epoch, self.step)
        if not runtime.is_main:
            self.last_checkpoint = where
            return
        state = dict(epoch=self.epoch, step=self.step, arch=cfg.model.arch, state_dict=with_prefix(self.moco.state_dict()),
                     optimizer=self.optimizer.state_dict(), config=to_dict(cfg), steps_per_epoch=self.steps,
                     batch_size=cfg.optim.batch_size, world_size=runtime.world_size)
        if self.train_step.scaler.is_enabled():
            state["scaler"] = self.train_step.scaler.state_dict()
        state = to_host(state)
        if ranks is not None:
            state["ranks"] = ranks
        self.writer.submit(state, path, *([self.run_dir.epoch_checkpoint(self.epoch)] if keep else []),
                           then=functools.partial(self.written, where, row))

    def written(self, where: tuple[Path, int, int], row: dict | None) -> None:
        """On the writer's thread, once the checkpoint at `where` is on disk."""
        self.last_checkpoint = where
        if row is not None:
            self.run_dir.append_metrics(row)

    def write_failed(self) -> None:
        """Every rank stops on rank 0's failed checkpoint write, learnt at a check-in, not rank 0 alone."""
        self.writer.wait()  # rank 0: raises the write's own error
        raise CheckpointError("rank 0 could not write its checkpoint; its log says why")

    def stop(self) -> None:
        """Every rank leaves together once rank 0's checkpoint is on disk: a rank that left first would have the
        launcher end the others, the writer among them."""
        failed = torch.tensor([int(self.runtime.is_main and self.writer.failed(wait=True))], device=self.runtime.device)
        if max_over_ranks(failed, self.runtime)[0]:
            self.write_failed()
        raise Interrupted(self.interrupted_message())

    def describe(self, epoch: int, step: int) -> str:
        return f"epoch {epoch}" if not step else f"{epoch} epochs and {step}/{self.steps} steps of epoch {epoch + 1}"

    def interrupted_message(self) -> str:
        """What a stop keeps: the newest checkpoint on disk, once a write in progress has ended; after a second
        signal, also the training it does not keep."""
        try:
            self.writer.wait()
            failure = ""
        except CheckpointError as e:
            failure = f"; {e}"
        trained = self.epoch, self.step
        lost = "" if self.last_checkpoint and self.last_checkpoint[1:] == trained else \
            f" (the training to {self.describe(*trained)} is not kept{failure})"
        if self.last_checkpoint is None:
            return "interrupted before any checkpoint was written" + ("" if trained == (0, 0) else lost)
        path, epoch, step = self.last_checkpoint
        return f"interrupted: {path} holds {self.describe(epoch, step)}; continue with --resume {path}" + lost


class NothingLeft(ConfigError):
    """Resuming a run that has already trained every epoch asked for."""

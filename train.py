"""MoCo v1/v2 pretraining: a loader from `pipeline`, a MoCo model from `model`, one loop.

    python train.py                                   # MoCo v2 on Fashion-MNIST, CPU, a few minutes
    python train.py --preset imagenet --data /imagenet --loader dali
    torchrun --nproc_per_node 8 train.py --preset imagenet --data /imagenet --loader dali

Writes OUT/metrics.jsonl (one row per epoch; epoch 0 is the random init) and OUT/checkpoint_*.pth.tar
in the official layout. `--help` lists every flag.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, with_prefix, without_prefix
from engine.config import ConfigError, TrainConfig, parse_config, to_dict, validate
from engine.cuda_graph import GraphedStep
from engine.distributed import Runtime, init_runtime, shutdown
from engine.knn import extract_features, knn_top1
from engine.optim import build_optimizer, learning_rate, set_learning_rate
from engine.step import AMP_DTYPES, MocoStep, resolve_precision
from model import MoCo, build_encoder
from pipeline import build_loader
from pipeline.errors import DataError
from pipeline.torch_loader import build_eval_loader

USER_ERRORS = (ConfigError, DataError, CheckpointError)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
console = Console(stderr=True, soft_wrap=True)


def build_model(cfg: TrainConfig, runtime: Runtime):
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    moco = MoCo(functools.partial(build_encoder, m.arch), dim=m.moco_dim, K=m.moco_k, m=m.moco_m, T=m.moco_t,
                mlp=m.mlp, shuffle=m.shuffle, bn_splits=m.bn_splits)
    moco = moco.to(runtime.device, memory_format=torch.channels_last)
    if runtime.world_size == 1:
        return moco, moco
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # Ranks keep their own query-encoder BN buffers: broadcasting them, and the 32 MB queue, every step
    # buys nothing (the queues are identical by construction). torch 2.14 renamed the switch.
    ddp_init = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_init else {"broadcast_buffers": False}
    ddp = torch.nn.parallel.DistributedDataParallel(moco, device_ids=device_ids, **no_sync)
    return moco, ddp


def build_step(cfg: TrainConfig, runtime: Runtime, model, optimizer, precision: str) -> MocoStep | GraphedStep:
    step = MocoStep(model, optimizer, precision, runtime.device, cfg.model.fused_loss)
    return GraphedStep(step, runtime.world_size) if cfg.run.cuda_graphs else step


def build_knn_monitor(cfg: TrainConfig, runtime: Runtime, amp_dtype):
    """A callable giving kNN top-1 of the query encoder, or None (with a notice) when there is no labelled split."""
    r = cfg.run
    data = cfg.data.knn_data or (None if cfg.data.data.endswith(".beton") or cfg.data.loader == "synthetic"
                                 else cfg.data.data)
    if r.knn_every <= 0 or not runtime.is_main:
        return None
    if data is None:
        console.print("notice: no labelled data for the kNN monitor (give --knn-data); it is off")
        return None
    common = dict(image_size=cfg.data.image_size, batch_size=max(256, cfg.optim.batch_size // runtime.world_size),
                  device=runtime.device, dtype=amp_dtype or torch.float32, num_workers=cfg.data.workers, seed=r.seed)
    bank = build_eval_loader(data, "train", max_samples=r.knn_train_samples, **common)
    try:
        val = build_eval_loader(data, "val", max_samples=r.knn_val_samples, **common)
    except DataError as e:
        console.print(f"notice: kNN monitor off: {e}")
        return None

    def monitor(encoder) -> float:
        bank_feats, bank_labels = extract_features(encoder, bank, amp_dtype)
        feats, labels = extract_features(encoder, val, amp_dtype)
        return knn_top1(bank_feats, bank_labels, feats, labels, k=r.knn_k, t=r.knn_t)

    return monitor


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[img_s]:,.0f} img/s  lr {task.fields[lr]:.4g}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
    )


class StopRequest:
    """Ctrl-C or SIGTERM (a scheduler's stop) asks a single-process run to stop; it does so after the current
    step, or, between epochs, once the epoch's checkpoint is written, so a stop never costs a finished epoch.
    A second signal stops at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


stop_request = StopRequest()


def train_epoch(cfg: TrainConfig, runtime: Runtime, epoch: int, loader, step: MocoStep | GraphedStep,
                progress: Progress):
    """One pass over the loader; returns mean loss, images/s and the last lr. Reads the device only every
    --print-freq steps (for the progress bar) and once at the end."""
    steps = min(len(loader), cfg.run.max_steps or len(loader))
    task = progress.add_task(f"epoch {epoch + 1}/{cfg.run.epochs}", total=steps, loss=float("nan"), img_s=0.0, lr=0.0)
    loss_sum = torch.zeros((), device=runtime.device)
    start = time.perf_counter()
    for i, (im_q, im_k, _) in enumerate(loader):
        if i == steps:
            break
        lr = learning_rate(cfg.optim, epoch + i / steps, cfg.run.epochs)
        set_learning_rate(step.optimizer, lr)
        loss = step(im_q, im_k)
        loss_sum += loss
        stop_request.check()
        if (i + 1) % cfg.run.print_freq == 0 or i + 1 == steps:
            img_s = (i + 1) * cfg.optim.batch_size / (time.perf_counter() - start)
            progress.update(task, completed=i + 1, loss=float(loss), img_s=img_s, lr=lr)
    if runtime.world_size > 1:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= runtime.world_size
    mean_loss = float(loss_sum) / steps
    elapsed = time.perf_counter() - start
    return mean_loss, steps * cfg.optim.batch_size / elapsed, lr


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def restart_metrics(path: Path, keep_through_epoch: int) -> None:
    """On resume, drop rows the resumed run will write again."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["epoch"] <= keep_through_epoch))


def train(cfg: TrainConfig) -> dict:
    runtime = init_runtime(cfg.run.device)
    validate(cfg, runtime.world_size)
    precision = resolve_precision(cfg.run.precision, runtime.device)
    amp_dtype = AMP_DTYPES[precision]
    ckpt = load_checkpoint(cfg.run.resume) if cfg.run.resume else None
    loader_options = ({"steps": cfg.run.max_steps or 100} if cfg.data.loader == "synthetic"
                      else {"num_workers": cfg.data.workers})
    loader = build_loader(cfg.data.loader, cfg.data.data, batch_size=cfg.optim.batch_size // runtime.world_size,
                          image_size=cfg.data.image_size, device=runtime.device, aug=cfg.data.aug, rank=runtime.rank,
                          world_size=runtime.world_size, seed=cfg.run.seed, dtype=amp_dtype or torch.float32,
                          **loader_options)
    knn_monitor = build_knn_monitor(cfg, runtime, amp_dtype)
    moco, model = build_model(cfg, runtime)
    optimizer = build_optimizer(cfg.optim, moco.parameters())
    step = build_step(cfg, runtime, model, optimizer, precision)

    out = Path(cfg.run.out)
    metrics_path = out / "metrics.jsonl"
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    start_epoch = 0
    if ckpt is not None:
        try:
            moco.load_state_dict(without_prefix(ckpt["state_dict"]))
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {cfg.run.resume} does not fit this model/optimizer: "
                                  f"{str(e).strip().splitlines()[0]}") from None
        step.scaler.load_state_dict(ckpt.get("scaler", {}))
        start_epoch = ckpt["epoch"]
        if runtime.is_main:
            restart_metrics(metrics_path, start_epoch)
            console.print(f"resumed from {cfg.run.resume} at epoch {start_epoch}")
    elif runtime.is_main:
        metrics_path.write_text("")
        init_knn = knn_monitor(moco.encoder_q) if knn_monitor else None
        append_metrics(metrics_path, dict(epoch=0, loss=None, knn_top1=init_knn, img_per_s=None, lr=None))
        if init_knn is not None:
            console.print(f"epoch 0 (random init): kNN top-1 {init_knn:.2f}%")

    if runtime.is_main:
        console.print(f"MoCo {cfg.model.arch} | loader {cfg.data.loader} | {runtime.device} x{runtime.world_size} | "
                      f"{precision} | batch {cfg.optim.batch_size} | K {cfg.model.moco_k} | {len(loader)} steps/epoch")
    skipped_before = 0
    with progress_bar(runtime.is_main) as progress:
        for epoch in range(start_epoch, cfg.run.epochs):
            stop_request.check()  # after the last epoch's checkpoint
            # Every random draw of the epoch (shuffle-BN permutations) follows from (seed, epoch, rank),
            # so a resumed run continues exactly as an uninterrupted one.
            torch.manual_seed(cfg.run.seed * 100_003 + epoch * 1009 + runtime.rank)
            loader.set_epoch(epoch)
            loss, img_s, lr = train_epoch(cfg, runtime, epoch, loader, step, progress)
            skipped = int(step.nonfinite_steps) - skipped_before
            skipped_before += skipped
            if not runtime.is_main:
                continue
            if skipped:
                console.print(f"epoch {epoch + 1}: {skipped} steps had a non-finite loss; the fp16 GradScaler "
                              f"skipped their updates (scale now {step.scaler.get_scale():g})")
            last = epoch + 1 == cfg.run.epochs
            knn = knn_monitor(moco.encoder_q) if knn_monitor and ((epoch + 1) % cfg.run.knn_every == 0 or last) else None
            row = dict(epoch=epoch + 1, loss=loss, knn_top1=knn, img_per_s=img_s, lr=lr, skipped_steps=skipped)
            append_metrics(metrics_path, row)
            progress.console.print(
                f"epoch {epoch + 1}: loss {loss:.4f}  {img_s:,.0f} img/s" + (f"  kNN top-1 {knn:.2f}%" if knn else ""))
            state = dict(epoch=epoch + 1, arch=cfg.model.arch, state_dict=with_prefix(moco.state_dict()),
                         optimizer=optimizer.state_dict(), scaler=step.scaler.state_dict(), config=to_dict(cfg))
            save_checkpoint(state, out / "checkpoint_last.pth.tar")
            if (epoch + 1) % cfg.run.save_every == 0 or last:
                save_checkpoint(state, out / f"checkpoint_{epoch + 1:04d}.pth.tar")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if runtime.is_main else []
    knn_rows = [r for r in rows if r["knn_top1"] is not None]
    if len(knn_rows) >= 2:
        console.print(f"kNN top-1: {knn_rows[0]['knn_top1']:.2f}% at epoch {knn_rows[0]['epoch']} -> "
                      f"{knn_rows[-1]['knn_top1']:.2f}% at epoch {knn_rows[-1]['epoch']}")
    shutdown()
    return {"rows": rows}


def report_user_error(error: Exception) -> int:
    """One line on stderr for a problem the user can fix; the exit status for it."""
    print(f"error: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
    return 2


def report_interrupt(cfg: TrainConfig | None) -> int:
    """One line on where to pick up after Ctrl-C or SIGTERM: checkpoints are written at the end of each epoch."""
    if os.environ.get("RANK", "0") != "0":
        return 130
    last = Path(cfg.run.out) / "checkpoint_last.pth.tar" if cfg else None
    try:
        epoch = load_checkpoint(last)["epoch"] if last else None
    except CheckpointError:
        epoch = None
    if epoch is None:
        print("interrupted before the first epoch ended: no checkpoint was written", file=sys.stderr)
    else:
        print(f"interrupted: {last} holds epoch {epoch}; continue with --resume {last}", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    cfg = None
    stop_request.requested = False
    # Under torchrun, ranks would stop at different steps and leave the others waiting in a collective, so
    # there the signals keep their default effect (Ctrl-C interrupts, SIGTERM ends the process).
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    previous = {sig: signal.signal(sig, stop_request) for sig in STOP_SIGNALS} if single_process else {}
    try:
        cfg = parse_config(argv)
        train(cfg)
    except USER_ERRORS as e:
        return report_user_error(e)
    except KeyboardInterrupt:
        return report_interrupt(cfg)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())

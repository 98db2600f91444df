"""The loader, model and step under test, built by the trainer's own functions so that what is timed is what
trains. The step's variants (--precision, --no-channels-last, --compile, --no-fused-sgd, ...) come with the
config, as they do for train.py.
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.core import timing
from benchmarks.core.record import Record, peak_memory
from engine.builders import build_model, build_step, build_train_loader
from engine.cli import loader_options, resolve, validate
from engine.config import TrainConfig
from engine.distributed import Runtime
from engine.optim import build_optimizer
from engine.reporting import progress_bar
from engine.step import AMP_DTYPES
from engine.trainer import Trainer


def for_backend(cfg: TrainConfig, backend: str, runtime: Runtime) -> TrainConfig:
    """`cfg` with `backend` as its loader, checked and resolved as train.py does it."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=backend))
    validate(cfg, runtime.world_size, runtime.device.type)
    return resolve(cfg, runtime.world_size, runtime.device)


def input_dtype(precision: str) -> torch.dtype:
    """Loaders hand over batches in the autocast dtype, as in train.py."""
    return AMP_DTYPES[precision] or torch.float32


def per_rank_batch(cfg: TrainConfig, runtime: Runtime) -> int:
    return cfg.optim.batch_size // runtime.world_size


def loader(cfg: TrainConfig, runtime: Runtime, precision: str, batches: int):
    """train.py's loader for `cfg.data.loader`; a synthetic one is made `batches` long."""
    return build_train_loader(cfg, runtime, input_dtype(precision), loader_options(cfg), synthetic_steps=batches)


def endless(loader):
    """Batches across epoch boundaries, advancing the epoch as train.py does."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def moco_step(cfg: TrainConfig, runtime: Runtime, precision: str):
    """The trainer's model and step for `cfg`; returns (moco, step)."""
    moco, model = build_model(cfg, runtime)
    optimizer = build_optimizer(cfg.optim, moco.parameters())
    return moco, build_step(cfg, runtime, model, optimizer, precision)


def benchmark_trainer(cfg: TrainConfig, out: str, batches: int) -> Trainer:
    """A trainer for `cfg` that writes nothing worth keeping: no kNN monitor, no checkpoints, a scratch folder."""
    run = dataclasses.replace(
        cfg.run,
        out=out,
        knn_every=0,
        checkpoint_minutes=0,
        checkpoint_steps=0,
        resume=None,
        max_steps=batches if cfg.data.loader == "synthetic" else None,
    )
    trainer = Trainer(dataclasses.replace(cfg, run=run))
    trainer.build()
    trainer.report.progress = progress_bar(False)
    return trainer


def throughput_record(
    backend: str, windows: list[timing.Window], cfg: TrainConfig, runtime: Runtime, **fields
) -> Record:
    """The figures every throughput suite reports for a backend: images/s, host CPU per image, memory."""
    return Record(
        backend,
        timing.images_per_s(windows, cfg.optim.batch_size),
        timing.cpu_s_per_image(windows, per_rank_batch(cfg, runtime)),
        **peak_memory(runtime.device),
        **fields,
    )

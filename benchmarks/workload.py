"""The loader, model and step under test, built by train.py's own functions so that what is timed is what trains.

The variants a benchmark may switch (channels_last, torch.compile, foreach SGD) are applied on top, here only;
train.py's own variant flags (--precision, --fused-loss, --cuda-graphs, ...) come with the config.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import train
from benchmarks import host, timing
from engine.config import ConfigError, TrainConfig, validate
from engine.distributed import Runtime
from engine.optim import build_optimizer
from engine.step import AMP_DTYPES
from pipeline import build_loader


def for_backend(cfg: TrainConfig, backend: str, runtime: Runtime) -> TrainConfig:
    """`cfg` with `backend` as its loader, checked as train.py checks it."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=backend))
    validate(cfg, runtime.world_size)
    return cfg


def input_dtype(precision: str) -> torch.dtype:
    """Loaders hand over batches in the autocast dtype, as in train.py."""
    return AMP_DTYPES[precision] or torch.float32


def per_rank_batch(cfg: TrainConfig, runtime: Runtime) -> int:
    return cfg.optim.batch_size // runtime.world_size


def loader(cfg: TrainConfig, runtime: Runtime, precision: str, batches: int):
    """train.py's loader for `cfg.data.loader`; a synthetic one is made `batches` long."""
    options = {"steps": batches} if cfg.data.loader == "synthetic" else {"num_workers": cfg.data.workers}
    return build_loader(cfg.data.loader, cfg.data.data, batch_size=per_rank_batch(cfg, runtime),
                        image_size=cfg.data.image_size, device=runtime.device, aug=cfg.data.aug, rank=runtime.rank,
                        world_size=runtime.world_size, seed=cfg.run.seed, dtype=input_dtype(precision), **options)


def endless(loader):
    """Batches across epoch boundaries, advancing the epoch as train.py does."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def moco_step(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace):
    """train.py's model and MocoStep, with the benchmark's variants applied; returns (moco, step)."""
    moco, model = train.build_model(cfg, runtime)
    if not opts.channels_last:
        if runtime.world_size > 1:
            raise ConfigError("--no-channels-last is single-process only: DDP has already laid out its buckets")
        moco.to(memory_format=torch.contiguous_format)
    if opts.compile:
        moco.encoder_q.compile()
        moco.encoder_k.compile()
    if cfg.optim.optimizer == "sgd" and not opts.fused_sgd:
        o = cfg.optim
        params = [p for p in moco.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.wd, foreach=True)
    else:
        optimizer = build_optimizer(cfg.optim, moco.parameters())
    return moco, train.build_step(cfg, runtime, model, optimizer, precision)


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A loader batch as the step should get it (loaders hand over channels_last)."""
    return x if channels_last else x.contiguous()


def throughput_record(backend: str, windows: list, cfg: TrainConfig, runtime: Runtime, workers_rss_mb: float) -> dict:
    """The figures every throughput suite reports for a backend: images/s, host CPU per image, memory."""
    return {
        "backend": backend,
        "images_per_s": timing.images_per_s(windows, cfg.optim.batch_size),
        "cpu_s_per_image": timing.cpu_s_per_image(windows, per_rank_batch(cfg, runtime)),
        "peak_host_rss_mb": host.peak_rss_mb(),
        "workers_rss_mb": workers_rss_mb,
        "peak_device_mb": host.device_peak_mb(runtime.device),
    }

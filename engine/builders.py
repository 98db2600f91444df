"""The parts of a run, built from the config: the MoCo module (and its DDP wrapper), the step, the training
loader and the kNN monitor. Benchmarks build through these too, so that what they time is what trains."""

from __future__ import annotations

import functools
import inspect

import torch

from engine.config import TrainConfig
from engine.cuda_graph import GraphedStep
from engine.distributed import Runtime
from engine.reporting import console
from engine.step import MocoStep
from evaluation.data import build_eval_loader
from evaluation.knn import KnnMonitor, labelled_data
from model import MoCo, build_encoder
from model.moco import no_stage
from pipeline import build_loader
from pipeline.errors import DataError


def build_model(cfg: TrainConfig, runtime: Runtime):
    """The MoCo module and what the step calls: the module itself, or its DDP wrapper under torchrun."""
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    moco = MoCo(
        functools.partial(build_encoder, m.arch),
        dim=m.moco_dim,
        K=m.moco_k,
        m=m.moco_m,
        T=m.moco_t,
        mlp=m.mlp,
        shuffle=m.shuffle,
        bn_splits=m.bn_splits,
    )
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


def build_step(
    cfg: TrainConfig, runtime: Runtime, model, optimizer, precision: str, stage=no_stage
) -> MocoStep | GraphedStep:
    """The step `cfg.step` describes: the one code path for train.py and every benchmark."""
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.step.cudnn_benchmark
    step = MocoStep(model, optimizer, precision, runtime.device, cfg.step.fused_loss, stage, memory_format(cfg))
    return GraphedStep(step) if cfg.step.cuda_graphs else step


def build_train_loader(
    cfg: TrainConfig, runtime: Runtime, dtype: torch.dtype, loader_options: dict, synthetic_steps: int
):
    """train.py's loader for `cfg.data.loader`, this rank's share of the batch; a synthetic one is
    `synthetic_steps` long."""
    options = (
        {"steps": synthetic_steps}
        if cfg.data.loader == "synthetic"
        else {"num_workers": cfg.data.workers, **loader_options}
    )
    return build_loader(
        cfg.data.loader,
        cfg.data.data,
        batch_size=cfg.optim.batch_size // runtime.world_size,
        image_size=cfg.data.image_size,
        device=runtime.device,
        aug=cfg.data.aug,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=cfg.run.seed,
        dtype=dtype,
        **options,
    )


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
    common = dict(
        image_size=cfg.data.image_size,
        batch_size=max(256, cfg.optim.batch_size // runtime.world_size),
        device=runtime.device,
        dtype=amp_dtype or torch.float32,
        num_workers=cfg.data.workers,
        seed=r.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    bank = build_eval_loader(data, "train", max_samples=r.knn_train_samples, **common)
    try:
        val = build_eval_loader(data, "val", max_samples=r.knn_val_samples, **common)
    except DataError as e:
        if runtime.is_main:
            console.print(f"notice: kNN monitor off: {e}")
        return None
    return KnnMonitor(bank, val, amp_dtype, k=r.knn_k, t=r.knn_t)

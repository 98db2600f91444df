"""Our MoCo step against the peers', on the same model, batch, K, precision, threads and inputs, interleaved.

Sides, each timed in turn per repeat (A B C D A B C D ...) so drifting load hits all alike:
  - ours: the trainer's default step (split BN on one device, fused InfoNCE, channels_last, fused SGD);
  - ours --shuffle none: the same step without Shuffle BN, the ceiling split BN is measured against;
  - official: the official moco/builder.py step as its main_moco.py runs it, made single-process
    (`benchmarks/core/official_moco.py`: per-parameter momentum loop, `int(queue_ptr)`, concatenated logits and
    cross-entropy; no Shuffle BN, which the official code has only across processes);
  - lightly: lightly's MoCo v2 recipe as its documentation writes it (the `lightly` extra).
The peers run as their users run them: NCHW inputs, torch.optim.SGD's default kernel; every side under the same
autocast for bf16/fp16. Images/s is the median over repeats; the ratios are ours over each peer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from benchmarks.core import official_moco, report, timing, workload
from benchmarks.core.record import Record
from engine.config import ConfigError, TrainConfig
from engine.distributed import Runtime
from engine.step import AMP_DTYPES
from model import build_encoder

SIDES = ("ours", "ours --shuffle none", "official", "lightly")


def lightly_step(cfg: TrainConfig, device: torch.device, amp_dtype):
    """lightly's MoCo v2 example: backbone + MoCoProjectionHead, momentum copies, NTXentLoss with a memory bank."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    m = cfg.model
    resnet = build_encoder(m.arch, num_classes=m.moco_dim)  # lightly's examples take a torchvision ResNet's trunk
    features = resnet.fc.in_features
    backbone = nn.Sequential(*list(resnet.children())[:-1]).to(device)
    head = MoCoProjectionHead(features, features, m.moco_dim).to(device)
    backbone_momentum, head_momentum = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(head_momentum)
    criterion = NTXentLoss(temperature=m.moco_t, memory_bank_size=(m.moco_k, m.moco_dim)).to(device)  # the bank
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.wd)

    def step(x_query, x_key):
        update_momentum(backbone, backbone_momentum, m=m.moco_m)
        update_momentum(head, head_momentum, m=m.moco_m)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            query = head(backbone(x_query).flatten(start_dim=1))
            key = head_momentum(backbone_momentum(x_key).flatten(start_dim=1)).detach()
            loss = criterion(query.float(), key.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def official_step(cfg: TrainConfig, device: torch.device, amp_dtype):
    m = cfg.model
    model = official_moco.MoCo(
        functools.partial(build_encoder, m.arch), m.moco_dim, m.moco_k, m.moco_m, m.moco_t, m.mlp
    ).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.wd
    )

    def step(im_q, im_k):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output, target = model(im_q, im_k)
        loss = F.cross_entropy(output.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def our_step(cfg: TrainConfig, runtime: Runtime, precision: str, shuffle: str):
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shuffle=shuffle))
    _, step = workload.moco_step(cfg, runtime, precision)
    return step


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    if precision == "fp16":
        raise ConfigError("the peers suite compares fp32 or bf16 steps: the peers have no GradScaler for fp16")
    if runtime.world_size > 1:
        raise ConfigError("the peers suite runs on one process: the official-style step is made single-process")
    cfg = workload.for_backend(cfg, "synthetic", runtime)
    device, batch = runtime.device, workload.per_rank_batch(cfg, runtime)
    amp_dtype = AMP_DTYPES[precision]
    size = cfg.data.image_size
    generator = torch.Generator().manual_seed(cfg.run.seed)
    images = [torch.randn(batch, 3, size, size, generator=generator).to(device) for _ in range(4)]
    nchw = [(images[0], images[1]), (images[2], images[3])]
    channels_last = [tuple(x.contiguous(memory_format=torch.channels_last) for x in pair) for pair in nchw]
    steps = {
        "ours": (our_step(cfg, runtime, precision, cfg.model.shuffle), channels_last),
        "ours --shuffle none": (our_step(cfg, runtime, precision, "none"), channels_last),
        "official": (official_step(cfg, device, amp_dtype), nchw),
        "lightly": (lightly_step(cfg, device, amp_dtype), nchw),
    }
    iterations = {}
    for side, (step, inputs) in steps.items():
        cycle = itertools.cycle(inputs)
        iterations[side] = lambda step=step, cycle=cycle: step(*next(cycle))
        for _ in range(opts.warmup):
            iterations[side]()
    windows = {side: [] for side in SIDES}
    for _ in range(opts.repeats):
        for side in SIDES:
            windows[side].append(timing.timed_window(device, iterations[side], opts.steps))
    speed = {side: timing.images_per_s(windows[side], batch) for side in SIDES}
    return [
        workload.throughput_record(
            side,
            windows[side],
            cfg,
            runtime,
            stages={"step": timing.ms_per_iteration(windows[side])},
            notes=["interleaved windows: " + " ".join(SIDES)],
            extra={
                "images_per_s_per_repeat": [w.iterations * batch / w.seconds for w in windows[side]],
                "ratios": {
                    f"vs {peer}": speed[side] / speed[peer]
                    for peer in ("official", "lightly")
                    if side.startswith("ours")
                },
            },
        )
        for side in SIDES
    ]


def print_records(records: list[Record], console: Console) -> None:
    head = records[0]
    rows = dict(report.figures(head))
    table = Table(
        title=f"peers suite: {rows['run']}, {head.config['threads']} threads, {rows['device']}", title_justify="left"
    )
    for column in ("side", "images/s (median)", "per repeat", "host CPU ms/image", "vs official", "vs lightly"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for r in records:
        per_repeat = " ".join(f"{v:.2f}" for v in r.extra["images_per_s_per_repeat"])
        ratios = r.extra.get("ratios", {})
        table.add_row(
            r.backend,
            f"{r.images_per_s:.2f}",
            per_repeat,
            report.cpu_ms(r),
            *(f"{ratios[k]:.2f}x" if k in ratios else "" for k in ("vs official", "vs lightly")),
        )
    console.print(table)
    console.print(f"[dim]note: {head.notes[0]}[/dim]")

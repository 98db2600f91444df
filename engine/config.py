"""The one typed config object: built once from the command line (engine/cli.py), validated, then passed down.
It imports nothing of the project: the choices that registries own are checked where the parser is.

Sections follow ffcv-imagenet (data, model, optim, step, run); flags keep the official main_moco.py names
where one exists (--arch, --moco-k, --moco-m, --moco-t, --mlp, --lr, --wd, --batch-size, --resume).
A recipe under configs/ (`--config NAME` or a TOML file, as torchtitan keeps them) fills the defaults:
`fashion-cpu` (the default: minutes on 2 CPU cores; the field defaults below), `imagenet` (MoCo v2, 200
epochs), `imagenet-v2-800ep`, `imagenet-v1`. Any flag overrides its recipe's value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work."""


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DataConfig:
    data: str = _opt("fashion-mnist", "ImageFolder root (ImageNet layout), 'fashion-mnist[:DIR]', or a .beton (ffcv)")
    loader: str = _opt("torch", "data loader backend")
    image_size: int = _opt(28, "side of the square training views, in pixels")
    aug: str = _opt("v2", "augmentation recipe: v1 (MoCo aug), v2 (MoCo v2 aug+)")
    workers: Optional[int] = _opt(
        None, "loader worker processes/threads per rank (default: this node's cores per rank - 1, at most 16)"
    )
    knn_data: Optional[str] = _opt(None, "labelled data for the kNN monitor (default: --data unless it is a .beton)")
    loader_option: tuple[str, ...] = _opt(
        (),
        "KEY=VALUE options of the loader, e.g. decode=roi hw_decoder_load=0.75 "
        "(dali), order=random decode=twice (ffcv)",
    )


@dataclass
class ModelConfig:
    arch: str = _opt("resnet_mini_cifar", "encoder architecture (model/resnet.py)")
    moco_dim: int = _opt(128, "feature dimension")
    moco_k: int = _opt(1024, "queue size: number of negative keys; a multiple of the global batch")
    moco_m: float = _opt(0.99, "momentum of the key encoder")
    moco_t: float = _opt(0.1, "softmax temperature (paper: 0.07 for MoCo v1, 0.2 for v2)")
    mlp: bool = _opt(True, "2-layer MLP projection head (MoCo v2)")
    shuffle: str = _opt(
        "auto",
        "Shuffle BN: ddp (across processes), split (one device emulates --bn-splits GPUs), "
        "none; auto is ddp under torchrun, split otherwise",
    )
    bn_splits: int = _opt(4, "BN sub-batches per device in split mode (emulated GPUs)")


@dataclass
class OptimConfig:
    optimizer: str = _opt("sgd", "sgd (torch fused), lars, apex-sgd (needs apex importable)")
    batch_size: int = _opt(64, "global batch size, split evenly over the ranks")
    lr: float = _opt(0.03, "peak learning rate for the global batch")
    momentum: float = _opt(0.9, "SGD momentum")
    wd: float = _opt(1e-4, "weight decay")
    schedule: str = _opt("cos", "learning-rate schedule: cos (cosine), step (x0.1 at each --lr-steps epoch)")
    lr_steps: tuple[int, ...] = _opt((120, 160), "epochs at which the step schedule divides the lr by 10")
    warmup_epochs: float = _opt(0.0, "linear warm-up, in epochs (may be fractional)")
    fused_sgd: bool = _opt(True, "SGD's fused kernel, one launch for every parameter (--no-fused-sgd: foreach)")


@dataclass
class StepConfig:
    """How the step runs: every variant the benchmarks time, so that what they measure can be trained with."""

    precision: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (with GradScaler), fp32")
    channels_last: bool = _opt(True, "encoders and input views in the channels_last memory format")
    compile: bool = _opt(False, "torch.compile both encoders (the first steps compile)")
    cudnn_benchmark: bool = _opt(False, "let cuDNN time its convolution algorithms during the first steps")
    fused_loss: bool = _opt(True, "InfoNCE without materialising the N x (1+K) logits (model/infonce.py)")
    cuda_graphs: bool = _opt(False, "replay the whole step as one CUDA graph (one GPU, bf16/fp32, fused sgd)")


@dataclass
class RunConfig:
    epochs: int = _opt(2, "number of pretraining epochs")
    device: str = _opt("auto", "where to train: auto (a GPU where there is one), cpu, cuda")
    out: str = _opt("runs/moco", "output directory: metrics.jsonl and checkpoints")
    resume: Optional[str] = _opt(
        None,
        "checkpoint to resume from, exactly where it was cut (mid-epoch too); 'auto': "
        "OUT/checkpoint_last.pth.tar when it exists, else start fresh",
    )
    seed: int = _opt(0, "seed for initialisation, shuffles and augmentation")
    save_every: int = _opt(1, "keep checkpoint_EPOCH.pth.tar every N epochs (checkpoint_last is always written)")
    checkpoint_minutes: float = _opt(
        10.0,
        "also write checkpoint_last mid-epoch when this many minutes have passed "
        "since the last one (checked every --print-freq steps; 0: off)",
    )
    checkpoint_steps: int = _opt(0, "also write checkpoint_last mid-epoch every N steps (0: off)")
    dist_timeout_minutes: float = _opt(30.0, "under torchrun: how long a collective may wait for the other ranks")
    knn_every: int = _opt(1, "kNN monitor every N epochs; 0 disables it")
    knn_k: int = _opt(200, "neighbours of the weighted kNN monitor")
    knn_t: float = _opt(0.1, "temperature of the weighted kNN monitor")
    knn_train_samples: Optional[int] = _opt(
        10000,
        "labelled images in the kNN memory bank: a fixed random subset "
        "of the train split (all of it where it is smaller)",
    )
    knn_val_samples: Optional[int] = _opt(
        2000,
        "labelled images the kNN monitor classifies: a fixed random subset "
        "of the val split (all of it where it is smaller)",
    )
    print_freq: int = _opt(
        10,
        "steps between progress updates; each reads the loss back from the device and, "
        "under torchrun, has the ranks agree on stopping and checkpointing",
    )
    max_steps: Optional[int] = _opt(None, "stop each epoch after this many steps (smoke tests)")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    step: StepConfig = field(default_factory=StepConfig)
    run: RunConfig = field(default_factory=RunConfig)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def changed_settings(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """Flag -> (the saved config's value, this config's) for each setting that differs from `saved` (a checkpoint's
    `to_dict`); --resume itself, and settings the saved config predates, aside."""

    def plain(value):
        return tuple(value) if isinstance(value, list) else value

    changed = {}
    for section, values in to_dict(cfg).items():
        for name, value in values.items():
            was = saved.get(section, {}).get(name, value)
            if name != "resume" and plain(was) != plain(value):
                changed["--" + name.replace("_", "-")] = (was, value)
    return changed

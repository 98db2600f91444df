"""The one typed config object: built once from the command line, validated, then passed down.

Sections follow ffcv-imagenet (data, model, optim, step, run); flags keep the official main_moco.py names
where one exists (--arch, --moco-k, --moco-m, --moco-t, --mlp, --lr, --wd, --batch-size, --resume).
A preset fills the defaults: `fashion-cpu` (the default: minutes on 2 CPU cores) or `imagenet` (the
MoCo v2 paper: ResNet-50, 200 epochs, batch 256, lr 0.03, K=65536, T=0.2, MLP head, aug+, cosine).
Any flag overrides its preset value.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
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
    workers: Optional[int] = _opt(None, "loader worker processes/threads per rank (default: cores - 1, at most 8)")
    knn_data: Optional[str] = _opt(None, "labelled data for the kNN monitor (default: --data unless it is a .beton)")
    loader_option: tuple[str, ...] = _opt((), "KEY=VALUE options of the loader, e.g. decode=roi hw_decoder_load=0.75 "
                                              "(dali), order=random decode=twice (ffcv)")


@dataclass
class ModelConfig:
    arch: str = _opt("resnet_mini_cifar", "encoder architecture (see model/resnet.py ARCHS)")
    moco_dim: int = _opt(128, "feature dimension")
    moco_k: int = _opt(1024, "queue size: number of negative keys; a multiple of the global batch")
    moco_m: float = _opt(0.99, "momentum of the key encoder")
    moco_t: float = _opt(0.1, "softmax temperature (paper: 0.07 for MoCo v1, 0.2 for v2)")
    mlp: bool = _opt(True, "2-layer MLP projection head (MoCo v2)")
    shuffle: str = _opt("auto", "Shuffle BN: ddp (across processes), split (one device emulates --bn-splits GPUs), "
                                "none; auto is ddp under torchrun, split otherwise")
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
    device: str = _opt("auto", "auto, cpu, cuda")
    out: str = _opt("runs/moco", "output directory: metrics.jsonl and checkpoints")
    resume: Optional[str] = _opt(None, "checkpoint to resume from, exactly where it was cut (mid-epoch too); 'auto': "
                                       "OUT/checkpoint_last.pth.tar when it exists, else start fresh")
    seed: int = _opt(0, "seed for initialisation, shuffles and augmentation")
    save_every: int = _opt(1, "keep checkpoint_EPOCH.pth.tar every N epochs (checkpoint_last is always written)")
    checkpoint_minutes: float = _opt(10.0, "also write checkpoint_last mid-epoch when this many minutes have passed "
                                           "since the last one (checked every --print-freq steps; 0: off)")
    checkpoint_steps: int = _opt(0, "also write checkpoint_last mid-epoch every N steps (0: off)")
    dist_timeout_minutes: float = _opt(30.0, "under torchrun: how long a collective may wait for the other ranks")
    knn_every: int = _opt(1, "kNN monitor every N epochs; 0 disables it")
    knn_k: int = _opt(200, "neighbours of the weighted kNN monitor")
    knn_t: float = _opt(0.1, "temperature of the weighted kNN monitor")
    knn_train_samples: Optional[int] = _opt(10000, "labelled images in the kNN memory bank: a fixed random subset "
                                                   "of the train split (all of it where it is smaller)")
    knn_val_samples: Optional[int] = _opt(2000, "labelled images the kNN monitor classifies: a fixed random subset "
                                                "of the val split (all of it where it is smaller)")
    print_freq: int = _opt(10, "steps between progress updates; each reads the loss back from the device and, "
                               "under torchrun, has the ranks agree on stopping and checkpointing")
    max_steps: Optional[int] = _opt(None, "stop each epoch after this many steps (smoke tests)")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    step: StepConfig = field(default_factory=StepConfig)
    run: RunConfig = field(default_factory=RunConfig)


PRESETS: dict[str, dict[str, object]] = {
    # The dataclass defaults: MoCo v2 tuned so kNN clearly rises within minutes on 2 CPU cores
    # (a smaller batch, queue and temperature than the paper's; see the README's Results).
    "fashion-cpu": {},
    "imagenet": dict(
        data="", image_size=224, arch="resnet50", moco_k=65536, moco_m=0.999, moco_t=0.2, mlp=True,
        bn_splits=8, lr=0.03, batch_size=256, epochs=200, knn_train_samples=20000, knn_val_samples=5000, print_freq=50,
    ),
}

def choices() -> dict[str, tuple[str, ...]]:
    """The valid values of each choice flag, read from the registries they name."""
    from engine.optim import OPTIMIZERS, SCHEDULES
    from engine.step import AMP_DTYPES
    from model.moco import SHUFFLE_MODES
    from model.resnet import ARCHS
    from pipeline import LOADERS
    from pipeline.augs import AUG_RECIPES

    return {
        "loader": tuple(LOADERS), "aug": tuple(AUG_RECIPES), "arch": tuple(ARCHS), "shuffle": ("auto", *SHUFFLE_MODES),
        "optimizer": tuple(OPTIMIZERS), "schedule": tuple(SCHEDULES), "precision": ("auto", *AMP_DTYPES),
        "device": ("auto", "cpu", "cuda"),
    }


def _sections():
    """(name, dataclass) of each config section."""
    return [(section.name, section.default_factory) for section in dataclasses.fields(TrainConfig)]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default, shown once: a help text that says its own (a rule, not a value) keeps it."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="MoCo v1/v2 self-supervised pretraining. Run with no flags: MoCo v2 on Fashion-MNIST on CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--preset", default="fashion-cpu", help=f"defaults to start from: {', '.join(PRESETS)}")
    valid = choices()
    for section_name, section_type in _sections():
        group = parser.add_argument_group(section_name)
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            inner = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            help_text = f.metadata["help"] + (f" (one of: {', '.join(valid[f.name])})" if f.name in valid else "")
            if inner is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            elif typing.get_origin(inner) is tuple:
                group.add_argument(flag, type=typing.get_args(inner)[0], nargs="+", default=f.default, help=help_text)
            else:
                group.add_argument(flag, type=inner, default=f.default, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line, on top of the chosen preset, as a TrainConfig."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    parser.set_defaults(**PRESETS[preset])
    args = vars(parser.parse_args(argv))
    sections = {}
    for section_name, section_type in _sections():
        values = {f.name: args[f.name] for f in dataclasses.fields(section_type)}
        for name in ("lr_steps", "loader_option"):
            if name in values:
                values[name] = tuple(values[name])
        sections[section_name] = section_type(**values)
    return TrainConfig(**sections)


def validate(cfg: TrainConfig, world_size: int, device_type: str = "cpu") -> None:
    """Every check that needs no data, so a setting that cannot work fails in one line before any work."""
    valid_choices = choices()
    for section_name, _ in _sections():
        for name, value in dataclasses.asdict(getattr(cfg, section_name)).items():
            valid = valid_choices.get(name)
            if valid and value not in valid:
                raise ConfigError(f"unknown --{name.replace('_', '-')} {value!r}; choose one of: {', '.join(valid)}")
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    _check_ranges(cfg)
    if o.batch_size % world_size:
        raise ConfigError(f"--batch-size {o.batch_size} is not divisible by the world size {world_size}")
    if m.moco_k % o.batch_size:
        raise ConfigError(f"--moco-k {m.moco_k} is not a multiple of the global batch size {o.batch_size}")
    shuffle = m.shuffle if m.shuffle != "auto" else ("ddp" if world_size > 1 else "split")
    per_device = o.batch_size // world_size
    if shuffle == "split" and per_device % m.bn_splits:
        raise ConfigError(f"per-device batch {per_device} is not divisible by --bn-splits {m.bn_splits}")
    per_bn = per_device // m.bn_splits if shuffle == "split" else per_device
    if per_bn < 2:  # BatchNorm's training statistics need two samples; with one it fails at the first step
        how = f" split {m.bn_splits} ways by --bn-splits" if shuffle == "split" else ""
        fix = "raise --batch-size or lower --bn-splits" if shuffle == "split" else "raise --batch-size"
        raise ConfigError(f"--batch-size {o.batch_size} gives each BN sub-batch {per_bn} sample ({per_device} per "
                          f"device{how}); BatchNorm needs at least 2: {fix}")
    if shuffle == "ddp" and world_size == 1:
        raise ConfigError("--shuffle ddp needs several processes (torchrun); use split on one device")
    if not d.data and d.loader != "synthetic":
        raise ConfigError("no --data given (an ImageFolder root, 'fashion-mnist', or a .beton for --loader ffcv)")
    for flag, samples in {"--knn-train-samples": r.knn_train_samples, "--knn-val-samples": r.knn_val_samples}.items():
        if r.knn_every and samples is not None and samples < world_size:
            raise ConfigError(f"{flag} {samples} gives some of the {world_size} ranks no image to extract")
    if cfg.step.cuda_graphs:
        _check_capturable(cfg, world_size, device_type)
    _check_loader_options(cfg)


def _check_ranges(cfg: TrainConfig) -> None:
    """Each number inside the range where it means something."""
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    at_least_one = {"--batch-size": o.batch_size, "--epochs": r.epochs, "--moco-k": m.moco_k, "--moco-dim": m.moco_dim,
                    "--image-size": d.image_size, "--bn-splits": m.bn_splits, "--print-freq": r.print_freq,
                    "--save-every": r.save_every, "--knn-k": r.knn_k, "--max-steps": r.max_steps,
                    "--knn-train-samples": r.knn_train_samples, "--knn-val-samples": r.knn_val_samples}
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    not_negative = {"--workers": d.workers, "--wd": o.wd, "--warmup-epochs": o.warmup_epochs,
                    "--knn-every": r.knn_every, "--checkpoint-minutes": r.checkpoint_minutes,
                    "--checkpoint-steps": r.checkpoint_steps}
    for flag, value in not_negative.items():
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must not be negative, got {value}")
    positive = {"--lr": o.lr, "--moco-t": m.moco_t, "--knn-t": r.knn_t, "--dist-timeout-minutes": r.dist_timeout_minutes}
    for flag, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if not 0 <= m.moco_m <= 1:
        raise ConfigError(f"--moco-m must be in [0, 1], got {m.moco_m}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {o.momentum}")


def _check_capturable(cfg: TrainConfig, world_size: int, device_type: str) -> None:
    """What a CUDA-graphed step needs (engine/cuda_graph.py), checked before any data is read."""
    import torch

    from engine.step import resolve_precision

    if device_type != "cuda":
        raise ConfigError("--cuda-graphs needs a CUDA device")
    if world_size > 1:
        raise ConfigError("--cuda-graphs is single-process only (DDP's gradient hooks are not captured)")
    if resolve_precision(cfg.step.precision, torch.device(device_type)) == "fp16":
        raise ConfigError("--cuda-graphs needs --precision bf16 or fp32: fp16's GradScaler adjusts on the host")
    if cfg.optim.optimizer != "sgd" or not cfg.optim.fused_sgd:
        raise ConfigError("--cuda-graphs needs --optimizer sgd with --fused-sgd: the fused kernel reads the lr from "
                          "the device, which a graph can replay (the others read it on the host)")
    if cfg.step.compile:
        raise ConfigError("--cuda-graphs and --compile: choose one (the graph already replays the whole step)")


def loader_options(cfg: TrainConfig) -> dict[str, object]:
    """--loader-option as keyword arguments of the loader's build function (numbers and true/false converted)."""
    options = {}
    for text in cfg.data.loader_option:
        key, sep, value = text.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--loader-option takes KEY=VALUE, not {text!r}")
        options[key] = _option_value(value)
    return options


def _option_value(text: str):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _check_loader_options(cfg: TrainConfig) -> None:
    import importlib
    import inspect

    from pipeline import LOADERS

    options = loader_options(cfg)
    if not options:
        return
    accepted = inspect.signature(importlib.import_module(LOADERS[cfg.data.loader]).build).parameters
    fixed = {"data", "batch_size", "image_size", "device", "aug", "rank", "world_size", "seed", "dtype",
             "num_workers", "steps"}  # the loader contract, --workers, --max-steps
    for key in options:
        if key not in accepted or key in fixed:
            valid = ", ".join(k for k in accepted if k not in fixed)
            raise ConfigError(f"--loader-option {key}: the {cfg.data.loader} loader takes {valid or 'no options'}")


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

"""The command line over the config: one flag per field of each section (preset defaults under them), and
`validate`, every check that needs no data, reading the open choices (loaders, encoders, optimizers, ...) from
their registries."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import tomllib
import typing
from pathlib import Path

import torch

from engine.config import ConfigError, TrainConfig
from engine.optim import OPTIMIZERS, SCHEDULES
from engine.step import AMP_DTYPES, resolve_precision
from evaluation.cli import HelpFormatter
from model.moco import SHUFFLE_MODES
from model.resnet import ARCHS
from pipeline import LOADERS
from pipeline.augs import AUG_RECIPES


def choices() -> dict[str, tuple[str, ...]]:
    """The valid values of each choice flag, read from the registries they name."""
    return {
        "loader": tuple(LOADERS),
        "aug": tuple(AUG_RECIPES),
        "arch": tuple(ARCHS),
        "shuffle": ("auto", *SHUFFLE_MODES),
        "optimizer": tuple(OPTIMIZERS),
        "schedule": tuple(SCHEDULES),
        "precision": ("auto", *AMP_DTYPES),
        "device": ("auto", "cpu", "cuda"),
    }


RECIPES = Path(__file__).resolve().parents[1] / "configs"  # configs/NAME.toml: --config NAME


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.toml"))


def recipe_path(name_or_path: str) -> Path:
    """A recipe by name (configs/NAME.toml) or by path."""
    path = (
        RECIPES / f"{name_or_path}.toml"
        if "/" not in name_or_path and not name_or_path.endswith(".toml")
        else Path(name_or_path)
    )
    if not path.is_file():
        raise ConfigError(
            f"--config {name_or_path}: no such file or recipe; the recipes are: {', '.join(recipe_names())}"
        )
    return path


def read_recipe(path: Path) -> dict[str, object]:
    """A recipe file's values by field name: its `base` recipe's (a path beside it) first, then its own sections
    ([data], [model], [optim], [step], [run], the config's). A name that is no field is one line."""
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from None
    values = read_recipe(recipe_path(str(path.parent / recipe.pop("base")))) if "base" in recipe else {}
    fields = {name: {f.name for f in dataclasses.fields(section)} for name, section in _sections()}
    for section, entries in recipe.items():
        if section not in fields or not isinstance(entries, dict):
            raise ConfigError(f"--config {path}: {section!r} is no section; the sections are: {', '.join(fields)}")
        unknown = sorted(set(entries) - fields[section])
        if unknown:
            raise ConfigError(f"--config {path}: [{section}] has no {', '.join(unknown)}")
        values.update(entries)
    return values


def _sections():
    """(name, dataclass) of each config section."""
    return [(section.name, section.default_factory) for section in dataclasses.fields(TrainConfig)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="MoCo v1/v2 self-supervised pretraining. Run with no flags: MoCo v2 on Fashion-MNIST on CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--config",
        "--preset",
        default="fashion-cpu",
        metavar="RECIPE",
        help=f"the recipe whose values the flags start from: a TOML file, or one of configs/: "
        f"{', '.join(recipe_names())}",
    )
    valid = choices()
    for section_name, section_type in _sections():
        group = parser.add_argument_group(section_name)
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            inner = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            help_text = f.metadata["help"]
            if f.name in valid and not all(choice in help_text for choice in valid[f.name]):
                help_text += f" (one of: {', '.join(valid[f.name])})"  # the registry's list, where the help has none
            if inner is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            elif typing.get_origin(inner) is tuple:
                group.add_argument(flag, type=typing.get_args(inner)[0], nargs="+", default=f.default, help=help_text)
            else:
                group.add_argument(flag, type=inner, default=f.default, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line, on top of the chosen recipe, as a TrainConfig."""
    parser = build_parser()
    parser.set_defaults(**read_recipe(recipe_path(parser.parse_known_args(argv)[0].config)))
    args = vars(parser.parse_args(argv))
    sections = {}
    for section_name, section_type in _sections():
        values = {f.name: args[f.name] for f in dataclasses.fields(section_type)}
        for name in ("lr_steps", "loader_option"):
            if name in values:
                values[name] = tuple(values[name])
        sections[section_name] = section_type(**values)
    return TrainConfig(**sections)


def shuffle_mode(shuffle: str, world_size: int) -> str:
    """--shuffle auto: ddp across the ranks under torchrun, split (emulated GPUs) in a single process."""
    return shuffle if shuffle != "auto" else ("ddp" if world_size > 1 else "split")


def resolve(cfg: TrainConfig, world_size: int, device: torch.device) -> TrainConfig:
    """`cfg` with its auto values filled, once, for everything downstream to read: the Shuffle BN mode and the
    precision (bf16 on a GPU, fp32 on the CPU)."""
    model = dataclasses.replace(cfg.model, shuffle=shuffle_mode(cfg.model.shuffle, world_size))
    step = dataclasses.replace(cfg.step, precision=resolve_precision(cfg.step.precision, device))
    return dataclasses.replace(cfg, model=model, step=step)


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
    shuffle = shuffle_mode(m.shuffle, world_size)
    per_device = o.batch_size // world_size
    if shuffle == "split" and per_device % m.bn_splits:
        raise ConfigError(f"per-device batch {per_device} is not divisible by --bn-splits {m.bn_splits}")
    per_bn = per_device // m.bn_splits if shuffle == "split" else per_device
    if per_bn < 2:  # BatchNorm's training statistics need two samples; with one it fails at the first step
        how = f" split {m.bn_splits} ways by --bn-splits" if shuffle == "split" else ""
        fix = "raise --batch-size or lower --bn-splits" if shuffle == "split" else "raise --batch-size"
        raise ConfigError(
            f"--batch-size {o.batch_size} gives each BN sub-batch {per_bn} sample ({per_device} per "
            f"device{how}); BatchNorm needs at least 2: {fix}"
        )
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
    at_least_one = {
        "--batch-size": o.batch_size,
        "--epochs": r.epochs,
        "--moco-k": m.moco_k,
        "--moco-dim": m.moco_dim,
        "--image-size": d.image_size,
        "--bn-splits": m.bn_splits,
        "--print-freq": r.print_freq,
        "--save-every": r.save_every,
        "--knn-k": r.knn_k,
        "--max-steps": r.max_steps,
        "--knn-train-samples": r.knn_train_samples,
        "--knn-val-samples": r.knn_val_samples,
    }
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    not_negative = {
        "--workers": d.workers,
        "--wd": o.wd,
        "--warmup-epochs": o.warmup_epochs,
        "--knn-every": r.knn_every,
        "--checkpoint-minutes": r.checkpoint_minutes,
        "--checkpoint-steps": r.checkpoint_steps,
    }
    for flag, value in not_negative.items():
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must not be negative, got {value}")
    positive = {
        "--lr": o.lr,
        "--moco-t": m.moco_t,
        "--knn-t": r.knn_t,
        "--dist-timeout-minutes": r.dist_timeout_minutes,
    }
    for flag, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if not 0 <= m.moco_m <= 1:
        raise ConfigError(f"--moco-m must be in [0, 1], got {m.moco_m}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {o.momentum}")


def _check_capturable(cfg: TrainConfig, world_size: int, device_type: str) -> None:
    """What a CUDA-graphed step needs (engine/cuda_graph.py), checked before any data is read."""

    if device_type != "cuda":
        raise ConfigError("--cuda-graphs needs a CUDA device")
    if world_size > 1:
        raise ConfigError("--cuda-graphs is single-process only (DDP's gradient hooks are not captured)")
    if resolve_precision(cfg.step.precision, torch.device(device_type)) == "fp16":
        raise ConfigError("--cuda-graphs needs --precision bf16 or fp32: fp16's GradScaler adjusts on the host")
    if cfg.optim.optimizer != "sgd" or not cfg.optim.fused_sgd:
        raise ConfigError(
            "--cuda-graphs needs --optimizer sgd with --fused-sgd: the fused kernel reads the lr from "
            "the device, which a graph can replay (the others read it on the host)"
        )
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

    options = loader_options(cfg)
    if not options:
        return
    accepted = inspect.signature(importlib.import_module(LOADERS[cfg.data.loader]).build).parameters
    fixed = {
        "data",
        "batch_size",
        "image_size",
        "device",
        "aug",
        "rank",
        "world_size",
        "seed",
        "dtype",
        "num_workers",
        "steps",
    }  # the loader contract, --workers, --max-steps
    for key in options:
        if key not in accepted or key in fixed:
            valid = ", ".join(k for k in accepted if k not in fixed)
            raise ConfigError(f"--loader-option {key}: the {cfg.data.loader} loader takes {valid or 'no options'}")

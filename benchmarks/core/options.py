"""The command line: measurement flags here, every model/data/optimiser/step flag from train.py's own parser.

Taking train.py's flags (and presets) as they are means a benchmark measures exactly the run that the same
flags would train: `--preset imagenet` gives the paper's ResNet-50 recipe, the default the 2-core CPU one.
Suites and studies add flags of their own (`add_flags`); `chart` takes result files.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path
from types import ModuleType

from benchmarks.suites import SUITES
from engine.cli import build_parser as build_train_parser
from engine.cli import parse_config
from engine.config import ConfigError, TrainConfig
from pipeline.common import default_workers

CHART_HELP = "a PNG from any JSON results: stacked stage breakdowns and images/s per run"

TRAIN_FLAGS_NOTE = (
    "Model, data and optimiser flags are train.py's (python train.py --help), with its presets: e.g. --preset "
    "imagenet, --arch, --batch-size, --image-size, --moco-k, --data, --workers, --optimizer, --shuffle, "
    "--bn-splits, --device, and the step's variants: --precision, --[no-]channels-last, --compile, "
    "--cudnn-benchmark, --[no-]fused-sgd, --[no-]fused-loss, --cuda-graphs."
)


def count(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def add_measurement_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        nargs="+",
        default=None,
        metavar="NAME",
        help="loader backend(s), as --loader (default: train.py's --loader); the loader and "
        "profile suites take several",
    )
    parser.add_argument("--steps", type=count(1), default=20, help="timed steps (batches) per repeat")
    parser.add_argument("--warmup", type=count(0), default=5, help="untimed steps first (compilation, worker start)")
    parser.add_argument("--repeats", type=count(1), default=3, help="timed windows; images/s is their median")
    parser.add_argument(
        "--sample-images",
        type=count(1),
        default=64,
        help="images timed piece by piece for the torch loader's read/decode, augment, H2D",
    )
    parser.add_argument(
        "--threads",
        type=count(1),
        default=None,
        help="torch intra-op threads (default: torch's); 1 is steadier on a shared CPU",
    )
    parser.add_argument(
        "--check-syncs",
        action="store_true",
        help="run steps under torch.cuda.set_sync_debug_mode('error') on a GPU; on the CPU, "
        "list the ops that would sync on one (item, nonzero, boolean masks, ...)",
    )
    parser.add_argument(
        "--check-copies",
        action="store_true",
        help="count, per stage, the MB that copies and layout conversions write in one step "
        "(copy_, clone, contiguous, cat, gathers, .to(memory_format)) and where each is issued",
    )
    parser.add_argument("--trace", type=Path, metavar="DIR", help="write a torch.profiler Chrome trace here")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    parser.add_argument("--png", type=Path, metavar="FILE", help="write a chart of the results here")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Every suite's parser; the `selected` suite's module is imported for flags of its own (only that one: some
    import FFCV or kornia)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Throughput benchmarks of fast-moco.", epilog=TRAIN_FLAGS_NOTE
    )
    suites = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, (module, help_text) in SUITES.items():
        sub = suites.add_parser(
            name, help=help_text, description=help_text, allow_abbrev=False, epilog=TRAIN_FLAGS_NOTE
        )
        add_measurement_flags(sub)
        add_flags = getattr(importlib.import_module(module), "add_flags", None) if name == selected else None
        if add_flags:
            add_flags(sub)
    chart = suites.add_parser("chart", help=CHART_HELP, description=CHART_HELP, allow_abbrev=False)
    chart.add_argument(
        "results", nargs="+", type=Path, help="JSON files written by --json (folders: every JSON in them)"
    )
    chart.add_argument("--png", type=Path, required=True, metavar="FILE", help="the chart to write")
    return parser


def study_parser(study: ModuleType) -> argparse.ArgumentParser:
    """A study's own command line, `python -m benchmarks.studies.NAME [flags]`: a suite's, with no suite to name."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {study.__spec__.name}",
        description=study.__doc__,
        epilog=TRAIN_FLAGS_NOTE,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_measurement_flags(parser)
    if hasattr(study, "add_flags"):
        study.add_flags(parser)
    parser.set_defaults(suite=study.SUITE)
    return parser


def check_writable(path: Path | None, flag: str) -> None:
    """An output path that cannot be written fails now, not after the whole measurement."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"{flag} {path} cannot be written: {path.parent} is a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path} cannot be written: {e.strerror}") from None


def parse(argv: list[str], study: ModuleType | None = None) -> tuple[argparse.Namespace, TrainConfig | None]:
    """The benchmark (or `study`'s) flags, and the TrainConfig that the remaining (train.py) flags give; None for
    `chart`."""
    parser = study_parser(study) if study else build_parser(next((a for a in argv if not a.startswith("-")), None))
    opts, train_argv = parser.parse_known_args(argv)
    check_writable(getattr(opts, "json", None), "--json")
    check_writable(opts.png, "--png")
    if opts.suite == "chart":
        if train_argv:
            parser.error(f"unrecognized arguments: {' '.join(train_argv)}")
        return opts, None
    unknown = build_train_parser().parse_known_args(train_argv)[1]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither a benchmark nor a train.py flag)")
    cfg = parse_config(train_argv)
    opts.train_argv = train_argv
    workers = default_workers() if cfg.data.workers is None else cfg.data.workers
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=workers))
    opts.backend_given = opts.backend is not None
    opts.backend = opts.backend or [cfg.data.loader]
    return opts, cfg

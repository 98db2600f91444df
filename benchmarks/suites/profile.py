"""What limits training on this machine, and what to set: measure, decide, print the train.py command.

    python -m benchmarks profile --data /imagenet --preset imagenet --png profile.png --json profile.json

1. The step alone on synthetic on-device batches: the ceiling no loader can lift, for the configured step and
   the faster variants this device allows (bf16 where the run is fp32; CUDA graphs on a GPU).
2. Each loader that is installed and can read --data (or --backend's), alone, over a sweep of worker counts up
   to this machine's cores (per rank); on a GPU also DALI's decode strategies and hardware-decoder share.
3. End to end, the trainer's own loop with the fastest loader setting and step.

Every measurement, each step variant included, runs at least MIN_WARMUP untimed steps of its own first, so that
no variant is judged by its one-time costs (CUDA context and kernels, cuDNN autotuning, graph capture,
compilation, worker start).

The verdict (`verdict`, a pure function of the figures): host-CPU-bound when the loader and the step together
need more cores than the machine has at the step's full speed ((the loader's + the step's host CPU-seconds per
image) x the step's images/s). Else end to end's time splits into waiting for data (the data-wait fraction),
the step at its own speed (end to end / step) and the rest: overhead-bound when the rest is the largest share,
the time going neither to the loader nor to the step; else step-bound when the loader alone outruns the step,
loader-bound when it does not. With the figures that show it and the ready train.py command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.core import host, report
from benchmarks.core.record import Record
from benchmarks.suites import e2e, loader, step
from engine.cli import loader_options, validate
from engine.config import ConfigError, TrainConfig
from engine.distributed import Runtime
from engine.reporting import console
from engine.step import resolve_precision
from pipeline import LOADERS

# Loaders whose options the sweep varies on a GPU (their defaults first).
GPU_OPTIONS = {"dali": [{}, {"decode": "roi"}, {"hw_decoder_load": 0.3}, {"hw_decoder_load": 0.9}]}
FEEDS = 1.0  # a loader feeds the step when it gives at least this fraction of the step's images/s
MIN_WARMUP = 2  # untimed steps per measurement whatever --warmup says: a graph's first replay is its second call


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-workers", type=int, default=None, help="the largest worker count swept (default: the cores per rank)"
    )
    parser.add_argument(
        "--cores",
        type=int,
        default=None,
        help="judge against this many host cores, e.g. those of the machine that will train (default: this machine's)",
    )


def worker_counts(limit: int) -> list[int]:
    """1, 2, 4, ... and the limit itself."""
    counts = [1]
    while counts[-1] * 2 < limit:
        counts.append(counts[-1] * 2)
    return sorted({*counts, limit})


def readable_loaders(cfg: TrainConfig, requested: list[str] | None) -> list[str]:
    """The loaders to sweep: those asked for, else every installed one that reads this data."""
    if requested:
        return requested
    beton = cfg.data.data.endswith(".beton")
    installed = {
        "torch": True,
        "dali": importlib.util.find_spec("nvidia.dali") is not None,
        "ffcv": importlib.util.find_spec("ffcv") is not None,
    }
    return [name for name in LOADERS if name != "synthetic" and installed.get(name) and (name == "ffcv") == beton]


def step_variants(cfg: TrainConfig, runtime: Runtime) -> list[tuple[list[str], TrainConfig]]:
    """(flags, config) of the configured step and the faster variants this device can run."""
    variants = [([], cfg)]
    if resolve_precision(cfg.step.precision, runtime.device) == "fp32":
        variants.append(
            (["--precision", "bf16"], dataclasses.replace(cfg, step=dataclasses.replace(cfg.step, precision="bf16")))
        )
    if runtime.device.type == "cuda" and not cfg.step.cuda_graphs:
        graphed = dataclasses.replace(cfg, step=dataclasses.replace(cfg.step, cuda_graphs=True))
        try:
            validate(graphed, runtime.world_size, runtime.device.type)
            variants.append((["--cuda-graphs"], graphed))
        except ConfigError:
            pass
    return variants


@dataclasses.dataclass
class Setting:
    backend: str
    workers: int
    options: dict
    images_per_s: float
    cpu_s_per_image: float

    def flags(self) -> list[str]:
        options = [f"{k}={v}" for k, v in self.options.items()]
        return [
            "--loader",
            self.backend,
            "--workers",
            str(self.workers),
            *(["--loader-option", *options] if options else []),
        ]


def with_loader(cfg: TrainConfig, backend: str, workers: int, options: dict) -> TrainConfig:
    data = dataclasses.replace(
        cfg.data, loader=backend, workers=workers, loader_option=tuple(f"{k}={v}" for k, v in options.items())
    )
    return dataclasses.replace(cfg, data=data)


def workers(count: int) -> str:
    return report.plural(count, "worker")


def verdict(
    step_ips: float,
    step_cpu_s_per_image: float,
    loader: Setting,
    e2e_ips: float,
    data_wait_fraction: float,
    cores: int,
    max_workers: int,
) -> dict:
    """Which limit applies, and the figures that show it."""
    loader_cores, step_cores = loader.cpu_s_per_image * step_ips, step_cpu_s_per_image * step_ips
    cores_needed = loader_cores + step_cores
    e2e_over_step = e2e_ips / step_ips
    elsewhere = 1.0 - data_wait_fraction - e2e_over_step  # of end to end's time: neither data wait nor the step
    reached = f"{e2e_over_step:.2f} of the step with {100 * data_wait_fraction:.1f}% data wait"
    evidence = (
        f"step alone {step_ips:,.0f} img/s; best loader ({loader.backend}, {workers(loader.workers)}) "
        f"{loader.images_per_s:,.0f} img/s; at the step's speed the loader needs {loader_cores:.1f} host "
        f"cores ({1e3 * loader.cpu_s_per_image:.2f} CPU ms per image) and the step {step_cores:.1f}, "
        f"{cores_needed:.1f} of {cores}; end to end {e2e_ips:,.0f} img/s reaches {reached}"
    )
    if cores_needed > cores:
        bound, advice = (
            "host-cpu",
            (
                f"loader and step need {cores_needed:.1f} cores at full speed and there are "
                f"{cores}: a loader with less host work per image (DALI's GPU decoding, FFCV, "
                f"a lower-resolution .beton) or more cores"
            ),
        )
    elif elsewhere > max(data_wait_fraction, e2e_over_step):
        bound, advice = (
            "overhead",
            (
                f"end to end reaches {reached}: {100 * elsewhere:.0f}% of its time is neither waiting for data nor "
                f"the step at its own speed. The gap is outside the loader and the step as measured alone: the "
                f"trainer's loop around the step (the lr, the progress bar, device reads at each epoch's start and end "
                f"and every --print-freq steps, which few --steps make weigh on every step), Python, or loader and "
                f"step slowing each other; `python -m benchmarks e2e --backend synthetic` times the loop without a "
                f"loader, --trace shows where the time goes"
            ),
        )
    elif loader.images_per_s >= FEEDS * step_ips:
        bound, advice = (
            "step",
            ("the loader keeps up: a faster step is what helps (bf16, --cuda-graphs, --compile, a larger batch)"),
        )
    elif loader.workers >= max_workers:
        bound, advice = (
            "loader",
            (
                f"the loader is slower than the step and cores are free: more than the "
                f"{workers(max_workers)} swept (--max-workers)"
            ),
        )
    else:
        bound, advice = (
            "loader",
            (
                "the loader is slower than the step although cores and workers are free: "
                "reading is the limit (storage, file system, .beton on local disk)"
            ),
        )
    return {
        "bound": bound,
        "evidence": evidence,
        "advice": advice,
        "e2e_over_step": e2e_over_step,
        "data_wait_fraction": data_wait_fraction,
        "elsewhere_fraction": elsewhere,
        "cores_needed": cores_needed,
        "loader_cores": loader_cores,
        "step_cores": step_cores,
        "cores": cores,
    }


def warmed_up(opts: argparse.Namespace) -> argparse.Namespace:
    """`opts` with at least MIN_WARMUP warm-up steps: each measurement warms up on its own before it is timed."""
    return argparse.Namespace(**{**vars(opts), "warmup": max(opts.warmup, MIN_WARMUP)})


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    cores = (opts.cores or host.cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    counts = worker_counts(opts.max_workers or max(1, cores))
    backends = readable_loaders(cfg, opts.backend if opts.backend_given else None)
    if not backends:
        raise ConfigError(
            f"no installed loader reads {cfg.data.data} (a .beton needs ffcv; a folder or "
            f"fashion-mnist the torch or dali loader): give --backend"
        )
    opts = warmed_up(opts)
    variants = step_variants(cfg, runtime)
    plan = [(b, w, o) for b in backends for w in counts for o in [loader_options(cfg)]]
    if runtime.device.type == "cuda":
        plan += [(b, None, o) for b in backends for o in GPU_OPTIONS.get(b, [])[1:]]
    progress = Progress(
        TextColumn("[bold]profile"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        disable=not runtime.is_main,
    )
    with progress:
        task = progress.add_task("", total=len(variants) + len(plan) + 1)

        def advance(what: str) -> None:
            progress.update(task, advance=1, description=what)

        steps = []
        for flags, variant in variants:
            steps.append(
                (
                    flags,
                    variant,
                    step.measure(variant, runtime, resolve_precision(variant.step.precision, runtime.device), opts),
                )
            )
            advance(f"step {' '.join(flags) or 'as configured'}")
        best_flags, best_cfg, best_step = max(steps, key=lambda s: s[2].images_per_s)
        sweep = []
        for backend, count, options in plan:
            count = count or max((s for s in sweep if s.backend == backend), key=lambda s: s.images_per_s).workers
            record = loader.measure(
                with_loader(best_cfg, backend, count, options),
                runtime,
                resolve_precision(best_cfg.step.precision, runtime.device),
                backend,
                opts,
            )
            sweep.append(Setting(backend, count, options, record.images_per_s, record.cpu_s_per_image))
            advance(f"{backend}, {workers(count)} {' '.join(f'{k}={v}' for k, v in options.items())}")
        best = max(sweep, key=lambda s: s.images_per_s)
        chosen = with_loader(best_cfg, best.backend, best.workers, best.options)
        end_to_end = e2e.measure(
            chosen, runtime, resolve_precision(chosen.step.precision, runtime.device), best.backend, opts
        )
        advance("end to end")
    result = verdict(
        best_step.images_per_s,
        best_step.cpu_s_per_image,
        best,
        end_to_end.images_per_s,
        end_to_end.data_wait_fraction,
        cores,
        counts[-1],
    )
    replaced = ("--loader", "--workers", "--loader-option", *(f for f in best_flags if f.startswith("--")))
    command = ["python", "train.py", *without_flags(opts.train_argv, replaced), *best.flags(), *best_flags]
    if runtime.is_main:
        console.print(f"[bold]verdict: {result['bound']}-bound[/bold]. {result['advice']}.")
        console.print(f"evidence: {result['evidence']}")
        console.print(f"run: {shlex.join(command)}")
    return [
        Record(
            best.backend,
            end_to_end.images_per_s,
            best.cpu_s_per_image,
            {**best_step.stages, **end_to_end.stages},
            peak_host_rss_mb=end_to_end.peak_host_rss_mb,
            peak_device_mb=end_to_end.peak_device_mb,
            stage_groups={**best_step.stage_groups, **end_to_end.stage_groups},
            step_images_per_s=best_step.images_per_s,
            loader_images_per_s=best.images_per_s,
            data_wait_fraction=end_to_end.data_wait_fraction,
            notes=[
                "loaders alone are swept at the fastest step variant's input dtype; end to end is the trainer's "
                "loop with the fastest loader setting and step variant",
                f"each step variant, loader setting and end to end: {report.plural(opts.warmup, 'warm-up step')} "
                f"of its own before timing (--warmup, at least {MIN_WARMUP})",
            ],
            extra={
                "verdict": result,
                "recommended_command": command,
                "step_variants": [{"flags": flags, "images_per_s": r.images_per_s} for flags, _, r in steps],
                "sweep": [dataclasses.asdict(s) for s in sweep],
            },
        )
    ]


def without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` less the given flags and their values."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=")[0] in flags
        if not skipping:
            kept.append(arg)
    return kept

"""Throughput benchmarks: `python -m benchmarks SUITE [flags] [--json FILE] [--png FILE]`.

    python -m benchmarks profile --data /imagenet --preset imagenet         # what limits training, what to run
    python -m benchmarks step --steps 10                                   # the default CPU model, 2 cores
    python -m benchmarks loader --backend torch synthetic --data fashion-mnist --png loaders.png
    python -m benchmarks loader --backend dali --data /imagenet --loader-option decode=roi
    python -m benchmarks stages --preset imagenet --data /imagenet --backend dali --json stages.json
    python -m benchmarks step --preset imagenet --precision fp16 --compile --check-syncs --trace traces/
    torchrun --nproc_per_node 8 -m benchmarks step --preset imagenet       # all-gathers timed too
    python -m benchmarks chart benchmarks/results --png results.png

The suites are registered in benchmarks/suites/__init__.py; every one returns Records (core/record.py, the
JSON schema) that core/report.py prints and core/chart.py draws. Design studies run as
`python -m benchmarks.studies.NAME` (benchmarks/studies/).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from types import ModuleType

import torch
from rich.console import Console

import train
from benchmarks.core import chart, host, options, record, report
from benchmarks.suites import SUITES
from engine.distributed import init_runtime, pick_device, shutdown
from engine.step import resolve_precision


def run_suite(module: ModuleType, opts, cfg, command: list[str], console: Console) -> None:
    """Runs one suite (or study) and reports it on rank 0. Process-wide settings are put back after, so that
    main() can run inside a test process."""
    cudnn_benchmark = torch.backends.cudnn.benchmark
    with host.torch_threads(opts.threads):
        runtime = init_runtime(pick_device(cfg.run.device), cfg.run.dist_timeout_minutes)
        try:
            precision = resolve_precision(cfg.step.precision, runtime.device)
            results = module.run(cfg, runtime, precision, opts)
            if not runtime.is_main:
                return
            head = record.header(opts.suite, runtime, cfg, precision, opts, command)
            records = [dataclasses.replace(r, **head) for r in results]
            print_records = getattr(module, "print_records", None)  # a suite may print its own table
            if print_records:
                print_records(records, console)
            else:
                for r in records:
                    report.print_record(r, console)
            if opts.json:
                record.write_json(opts.json, records)
            if opts.png:
                chart.write_chart(records, opts.png)
        finally:
            shutdown()
            torch.backends.cudnn.benchmark = cudnn_benchmark


def main(argv: list[str] | None = None, study: ModuleType | None = None) -> int:
    """`python -m benchmarks SUITE ...`, or with `study` (a module of benchmarks/studies/) that study's command."""
    args = sys.argv[1:] if argv is None else argv
    console = Console()
    try:
        opts, cfg = options.parse(args, study)
        if opts.suite == "chart":
            records = chart.load_records(opts.results)
            report.print_comparison(records, console)
            chart.write_chart(records, opts.png)
        else:
            module = study or importlib.import_module(SUITES[opts.suite][0])
            command = ["python", "-m", study.__spec__.name if study else "benchmarks", *args]
            run_suite(module, opts, cfg, command, console)
    except train.USER_ERRORS as e:
        return train.report_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

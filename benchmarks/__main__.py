"""Throughput benchmarks: `python -m benchmarks SUITE [flags] [--json FILE] [--png FILE]`.

    python -m benchmarks profile --data /imagenet --preset imagenet         # what limits training, what to run
    python -m benchmarks step --steps 10                                   # the default CPU model, 2 cores
    python -m benchmarks loader --backend torch synthetic --data fashion-mnist --png loaders.png
    python -m benchmarks loader --backend dali --data /imagenet --loader-option decode=roi
    python -m benchmarks stages --preset imagenet --data /imagenet --backend dali --json stages.json
    python -m benchmarks step --preset imagenet --precision fp16 --compile --check-syncs --trace traces/
    torchrun --nproc_per_node 8 -m benchmarks step --preset imagenet       # all-gathers timed too
    python -m benchmarks chart benchmarks/results --png results.png

The suites are registered in benchmarks/suites/__init__.py; every one returns records that core/report.py
prints and writes in one schema, which core/chart.py draws.
"""

from __future__ import annotations

import importlib
import sys

import torch
from rich.console import Console

import train
from benchmarks.core import chart, host, options, report
from benchmarks.suites import SUITES
from engine.distributed import init_runtime, pick_device, shutdown
from engine.step import resolve_precision


def run_suite(suite: str, opts, cfg, command: list[str], console: Console) -> None:
    """Runs one suite and reports it on rank 0. Process-wide settings are put back after, so that main() can
    run inside a test process."""
    cudnn_benchmark = torch.backends.cudnn.benchmark
    with host.torch_threads(opts.threads):
        runtime = init_runtime(pick_device(cfg.run.device), cfg.run.dist_timeout_minutes)
        try:
            precision = resolve_precision(cfg.step.precision, runtime.device)
            module = importlib.import_module(SUITES[suite][0])
            results = module.run(cfg, runtime, precision, opts)
            if not runtime.is_main:
                return
            doc = report.document(report.header(suite, runtime, cfg, precision, opts, command), results)
            print_records = getattr(module, "print_records", None)  # a suite may print its own table
            if print_records:
                print_records(report.records(doc), console)
            else:
                for record in report.records(doc):
                    report.print_record(record, console)
            if opts.json:
                report.write_json(opts.json, doc)
            if opts.png:  # a suite may draw its own chart
                getattr(module, "write_chart", chart.write_chart)(report.records(doc), opts.png)
        finally:
            shutdown()
            torch.backends.cudnn.benchmark = cudnn_benchmark


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = ["python", "-m", "benchmarks", *args]
    console = Console()
    try:
        opts, cfg = options.parse(args)
        if opts.suite == "chart":
            records = chart.load_records(opts.results)
            report.print_comparison(records, console)
            chart.write_chart(records, opts.png)
        else:
            run_suite(opts.suite, opts, cfg, command, console)
    except train.USER_ERRORS as e:
        return train.report_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

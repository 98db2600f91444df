"""A whole training run, as train.py runs it (the trainer, the kNN monitor at its cadence, checkpoints): images/s
of each epoch, the time it waited for data, loss and kNN top-1 per epoch, the wall time; with --linear-probe,
the linear probe on the final checkpoint (evaluation.lincls). This is how the README's main command is measured:

    python -m benchmarks train --linear-probe --json benchmarks/results/fashion_cpu_default_run.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.core import timing
from benchmarks.core.record import Record, peak_memory
from engine.config import TrainConfig
from engine.distributed import Runtime
from engine.trainer import Trainer
from evaluation import lincls


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="then the linear probe (python -m evaluation.lincls) on the final checkpoint",
    )


def run(cfg: TrainConfig, runtime: Runtime, precision: str, opts: argparse.Namespace) -> list[Record]:
    with tempfile.TemporaryDirectory() as out:
        run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=out, resume=None))
        with timing.timed(cpu=True) as whole:
            trainer = Trainer(run_cfg)
            try:
                trainer.build()
                rows = trainer.run()["rows"]
            finally:
                trainer.close()
        if not runtime.is_main:  # rank 0 reports the run
            return []
        probe = linear_probe(cfg, Path(out) / "checkpoint_last.pth.tar") if opts.linear_probe else None
    epochs = [r for r in rows if r["epoch"] > 0]
    step_ms = 1e3 * cfg.optim.batch_size / statistics.median(r["img_per_s"] for r in epochs)
    wait = statistics.median(r["data_wait"] for r in epochs)
    images = len(epochs) * trainer.steps * cfg.optim.batch_size
    knn = [r for r in rows if r["knn_top1"] is not None]
    return [
        Record(
            cfg.data.loader,
            statistics.median(r["img_per_s"] for r in epochs),
            whole.cpu_seconds / images,
            {"data_wait": wait * step_ms, "step_and_loop": (1 - wait) * step_ms},
            **peak_memory(runtime.device),
            stage_groups={"one step of training (median epoch)": ["data_wait", "step_and_loop"]},
            data_wait_fraction=wait,
            notes=[
                "host CPU per image: the whole run (kNN monitor and checkpoints included) over the trained images",
                "kNN: weighted, k=--knn-k, T=--knn-t, --knn-train-samples bank, --knn-val-samples queries",
            ],
            extra={
                "metrics": rows,
                "knn_top1": {"random_init": knn[0]["knn_top1"], "final": knn[-1]["knn_top1"]} if knn else None,
                "linear_probe_top1": probe,
                "wall_s": whole.seconds,
            },
        )
    ]


def linear_probe(cfg: TrainConfig, checkpoint: Path) -> float:
    result = checkpoint.with_name("lincls.json")
    args = [str(checkpoint), "--json", str(result)]  # the probe reads the run's labelled data and size from it
    if lincls.main(args) != 0:
        raise RuntimeError("the linear probe failed")
    return json.loads(result.read_text())["top1"]

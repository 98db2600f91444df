"""What a run says about itself: the fraction of time it waited for data, and TensorBoard scalars under OUT/tb."""

import logging
import time

import pytest
from conftest import metrics_rows
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.cli import parse_config
from engine.trainer import Trainer

QUICK = [
    "--epochs",
    "2",
    "--max-steps",
    "6",
    "--batch-size",
    "16",
    "--moco-k",
    "64",
    "--image-size",
    "16",
    "--workers",
    "0",
    "--print-freq",
    "2",
    "--checkpoint-minutes",
    "0",
]


def run(args, slow_loader_s: float = 0.0) -> Trainer:
    trainer = Trainer(parse_config(args))
    try:
        trainer.build()
        if slow_loader_s:
            loader, iterate = trainer.loader, type(trainer.loader).__iter__

            def slow(self):
                for batch in iterate(self):
                    time.sleep(slow_loader_s)
                    yield batch

            loader.__class__ = type("Slow", (type(loader),), {"__iter__": slow})
        trainer.run()
    finally:
        trainer.close()
    return trainer


def epoch_rows(out):
    return metrics_rows(out)[1:]


def test_data_wait_is_near_one_behind_a_slow_loader_and_near_zero_with_synthetic(small_fashion, tmp_path):
    run(["--data", small_fashion, "--out", str(tmp_path / "slow"), "--knn-every", "0", *QUICK], slow_loader_s=0.5)
    run(["--loader", "synthetic", "--out", str(tmp_path / "synthetic"), *QUICK])
    assert all(row["data_wait"] > 0.8 for row in epoch_rows(tmp_path / "slow"))
    assert all(row["data_wait"] < 0.05 for row in epoch_rows(tmp_path / "synthetic"))


def test_tensorboard_holds_the_promised_scalars(small_fashion, tmp_path):
    run(
        [
            "--data",
            small_fashion,
            "--out",
            str(tmp_path),
            "--knn-train-samples",
            "128",
            "--knn-val-samples",
            "64",
            *QUICK,
        ]
    )
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/img_per_s",
        "epoch/loss",
        "epoch/lr",
        "epoch/img_per_s",
        "epoch/data_wait_fraction",
        "epoch/knn_top1",
        "epoch/peak_host_rss_mb",
    } <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert [e.step for e in events.Scalars("epoch/knn_top1")] == [0, 6, 12]  # the global step at each epoch's end
    rows = epoch_rows(tmp_path)
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([r["loss"] for r in rows])
    assert [e.value for e in events.Scalars("epoch/data_wait_fraction")] == pytest.approx(
        [r["data_wait"] for r in rows]
    )


def test_a_resumed_run_keeps_every_scalar_of_its_checkpoint_and_writes_no_step_twice(small_fashion, tmp_path, caplog):
    """Epoch 1, then a resume for epoch 2: TensorBoard reads one curve, with nothing purged or written twice."""
    args = ["--data", small_fashion, "--out", str(tmp_path), "--knn-every", "0", *QUICK]
    run([*args, "--epochs", "1"])
    run([*args, "--epochs", "2", "--resume", "auto"])
    events = EventAccumulator(str(tmp_path / "tb"))
    with caplog.at_level(logging.WARNING, logger="tensorboard"):
        events.Reload()
    assert not [r for r in caplog.records if "out of order" in r.getMessage()], caplog.text
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert [e.step for e in events.Scalars("epoch/loss")] == [6, 12]
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([r["loss"] for r in epoch_rows(tmp_path)])

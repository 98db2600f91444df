"""Exact resumption: a run cut anywhere (inside an epoch or between epochs) and resumed ends with the same weights,
queue, optimizer state and metrics as the run that was never cut, with worker processes on."""

import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from engine.config import parse_config
from engine.trainer import Interrupted, Trainer


def run_args(data, out, loader="torch", workers=2, extra=()):
    """Two epochs of 100 steps; the kNN monitor at the random init and at the end."""
    return ["--data", data, "--loader", loader, "--epochs", "2", "--batch-size", "16", "--moco-k", "64",
            "--image-size", "16", "--workers", str(workers), "--knn-train-samples", "256", "--knn-val-samples",
            "128", "--knn-every", "2", "--print-freq", "10", "--checkpoint-minutes", "0", "--out", str(out), *extra]


def stop_at(args, epoch, step):
    """Runs `args` in this process and asks it to stop when step `step` of epoch `epoch` (0-based) has been handed
    out, as a SIGTERM would; returns the Interrupted message."""
    trainer = Trainer(parse_config(args))
    try:
        trainer.build()
        loader, iterate = trainer.loader, type(trainer.loader).__iter__

        def iterate_and_ask(self):
            for i, batch in enumerate(iterate(self), start=trainer.step):
                if (trainer.epoch, i) == (epoch, step):
                    trainer.signals.requested = True
                yield batch

        loader.__class__ = type("Stopping", (type(loader),), {"__iter__": iterate_and_ask})
        with pytest.raises(Interrupted) as stopped:
            trainer.run()
        return str(stopped.value)
    finally:
        trainer.close()


def assert_same_run(a, b):
    ca, cb = load_checkpoint(a / "checkpoint_last.pth.tar"), load_checkpoint(b / "checkpoint_last.pth.tar")
    assert ca["epoch"] == cb["epoch"] and ca["step"] == cb["step"] == 0
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    for pa, pb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    rows_a = [r for r in train_rows(a)]
    rows_b = [r for r in train_rows(b)]
    assert [(r["epoch"], r["loss"], r["knn_top1"]) for r in rows_a] == [(r["epoch"], r["loss"], r["knn_top1"])
                                                                        for r in rows_b]


def train_rows(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(small_fashion, tmp_path_factory):
    """Per loader: the run that is never cut. The torch loader's runs without worker processes, the cut runs with
    two: results must not depend on the worker count."""
    runs = {}

    def get(loader):
        if loader not in runs:
            out = tmp_path_factory.mktemp(f"whole_{loader}")
            assert train.main(run_args(small_fashion, out, loader, workers=0 if loader == "torch" else 2)) == 0
            runs[loader] = out
        return runs[loader]

    return get


@pytest.mark.parametrize("loader, epoch, step", [("torch", 0, 57), ("dali", 1, 23)])
def test_cut_inside_an_epoch_resumes_bit_exactly(small_fashion, uninterrupted, tmp_path, loader, epoch, step):
    message = stop_at(run_args(small_fashion, tmp_path, loader), epoch, step)
    last = tmp_path / "checkpoint_last.pth.tar"
    assert message == f"interrupted: {last} holds {epoch} epochs and {step + 1}/100 steps of epoch {epoch + 1}; " \
                      f"continue with --resume {last}"
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["step"]) == (epoch, step + 1) and len(checkpoint["ranks"]) == 1
    assert train.main(run_args(small_fashion, tmp_path, loader, extra=["--resume", "auto"])) == 0
    assert_same_run(uninterrupted(loader), tmp_path)


def test_cut_between_epochs_resumes_bit_exactly(small_fashion, uninterrupted, tmp_path):
    """A stop during the epoch's last step: the epoch ends (kNN, metrics row, checkpoint) before the run stops."""
    last = tmp_path / "checkpoint_last.pth.tar"
    assert stop_at(run_args(small_fashion, tmp_path), 0, 99) == \
        f"interrupted: {last} holds epoch 1; continue with --resume {last}"
    assert load_checkpoint(last)["step"] == 0 and "ranks" not in load_checkpoint(last)
    assert train.main(run_args(small_fashion, tmp_path, extra=["--resume", str(last)])) == 0
    assert_same_run(uninterrupted("torch"), tmp_path)

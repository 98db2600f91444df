"""Exact resumption: a run cut anywhere (inside an epoch or between epochs) and resumed ends with the same weights,
queue, optimizer state and metrics as the run that was never cut, with worker processes on."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import metrics_rows

import train
from engine.cli import parse_config
from engine.trainer import Interrupted, Trainer, TrainingDiverged
from model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_args(data, out, loader="torch", workers=2, extra=()):
    """Two epochs of 100 steps; the kNN monitor at the random init and at the end."""
    return [
        "--data",
        data,
        "--loader",
        loader,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--moco-k",
        "64",
        "--image-size",
        "16",
        "--workers",
        str(workers),
        "--knn-train-samples",
        "256",
        "--knn-val-samples",
        "128",
        "--knn-every",
        "2",
        "--print-freq",
        "10",
        "--checkpoint-minutes",
        "0",
        "--out",
        str(out),
        *extra,
    ]


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
    rows_a = [r for r in metrics_rows(a)]
    rows_b = [r for r in metrics_rows(b)]
    assert [(r["epoch"], r["loss"], r["knn_top1"]) for r in rows_a] == [
        (r["epoch"], r["loss"], r["knn_top1"]) for r in rows_b
    ]


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
    assert (
        message == f"interrupted: {last} holds {epoch} epochs and {step + 1}/100 steps of epoch {epoch + 1}; "
        f"continue with --resume {last}"
    )
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["step"]) == (epoch, step + 1) and len(checkpoint["ranks"]) == 1
    assert train.main(run_args(small_fashion, tmp_path, loader, extra=["--resume", "auto"])) == 0
    assert_same_run(uninterrupted(loader), tmp_path)


def test_cut_between_epochs_resumes_bit_exactly(small_fashion, uninterrupted, tmp_path):
    """A stop during the epoch's last step: the epoch ends (kNN, metrics row, checkpoint) before the run stops."""
    last = tmp_path / "checkpoint_last.pth.tar"
    assert (
        stop_at(run_args(small_fashion, tmp_path), 0, 99)
        == f"interrupted: {last} holds epoch 1; continue with --resume {last}"
    )
    assert load_checkpoint(last)["step"] == 0 and "ranks" not in load_checkpoint(last)
    assert train.main(run_args(small_fashion, tmp_path, extra=["--resume", str(last)])) == 0
    assert_same_run(uninterrupted("torch"), tmp_path)


# --- resuming with other settings, and what must be refused -------------------------------------------------------

QUICK = [
    "--epochs",
    "1",
    "--max-steps",
    "3",
    "--batch-size",
    "16",
    "--moco-k",
    "64",
    "--image-size",
    "16",
    "--workers",
    "0",
    "--knn-every",
    "0",
    "--checkpoint-minutes",
    "0",
]


def quick_run(data, out, *extra):
    return train.main(["--data", data, "--out", str(out), *QUICK, *extra])


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    return lines[-1]


def test_resume_with_a_larger_batch_realigns_the_queue(small_fashion, tmp_path):
    """3 steps of 16 leave the queue pointer at 48, not a multiple of 32: the next keys wrap around the end."""
    assert quick_run(small_fashion, tmp_path) == 0
    assert int(load_checkpoint(tmp_path / "checkpoint_last.pth.tar")["state_dict"]["module.queue_ptr"]) == 48
    before = load_checkpoint(tmp_path / "checkpoint_last.pth.tar")["state_dict"]["module.queue"]
    assert (
        quick_run(
            small_fashion, tmp_path, "--batch-size", "32", "--epochs", "2", "--max-steps", "1", "--resume", "auto"
        )
        == 0
    )
    after = load_checkpoint(tmp_path / "checkpoint_last.pth.tar")["state_dict"]
    assert int(after["module.queue_ptr"]) == (48 + 32) % 64
    changed = (after["module.queue"] != before).any(dim=0).nonzero().flatten().tolist()
    assert changed == list(range(0, 16)) + list(range(48, 64))


def test_resume_an_fp32_checkpoint_in_fp16(small_fashion, tmp_path):
    assert quick_run(small_fashion, tmp_path) == 0
    assert quick_run(small_fashion, tmp_path, "--precision", "fp16", "--epochs", "2", "--resume", "auto") == 0
    assert "scaler" in load_checkpoint(tmp_path / "checkpoint_last.pth.tar")


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_resuming_a_contiguous_checkpoint_lays_momentum_out_like_channels_last_params(
    small_fashion, tmp_path, optimizer
):
    """CUDA's fused SGD refuses a momentum buffer whose strides differ from its parameter's: an NCHW checkpoint
    (--no-channels-last, or the official code's) resumed into a channels_last run must have its buffers re-laid."""
    assert quick_run(small_fashion, tmp_path, "--no-channels-last", "--optimizer", optimizer) == 0
    saved = load_checkpoint(tmp_path / "checkpoint_last.pth.tar")["optimizer"]["state"]
    assert any(
        v.dim() == 4 and not v.is_contiguous(memory_format=torch.channels_last)
        for state in saved.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    trainer = Trainer(
        parse_config(
            [
                "--data",
                small_fashion,
                "--out",
                str(tmp_path),
                *QUICK,
                "--optimizer",
                optimizer,
                "--epochs",
                "2",
                "--resume",
                "auto",
            ]
        )
    )
    try:
        trainer.build()
        states = [(p, trainer.optimizer.state[p]) for group in trainer.optimizer.param_groups for p in group["params"]]
        assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) for p, _ in states)
        buffers = [
            (p, v) for p, state in states for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape
        ]
        assert len(buffers) == len(states)
        assert all(v.stride() == p.stride() for p, v in buffers)
        trainer.run()  # and it trains on
    finally:
        trainer.close()


def test_resume_with_another_optimizer_is_refused(small_fashion, tmp_path, capsys):
    assert quick_run(small_fashion, tmp_path) == 0
    assert quick_run(small_fashion, tmp_path, "--optimizer", "lars", "--epochs", "2", "--resume", "auto") == 2
    assert "is --optimizer sgd's, not lars's" in error_line(capsys)


def test_a_checkpoint_that_does_not_fit_says_what_does_not(small_fashion, tmp_path, capsys):
    assert quick_run(small_fashion, tmp_path) == 0
    assert quick_run(small_fashion, tmp_path, "--moco-dim", "64", "--epochs", "2", "--resume", "auto") == 2
    line = error_line(capsys)
    assert "does not fit this model" in line and "size mismatch for queue" in line


def test_resuming_a_finished_run_says_nothing_is_left(small_fashion, tmp_path, capsys):
    assert quick_run(small_fashion, tmp_path) == 0
    capsys.readouterr()
    assert quick_run(small_fashion, tmp_path, "--resume", "auto") == 0
    assert capsys.readouterr().err.strip().startswith("nothing left to train")


def test_a_torn_last_metrics_line_does_not_block_resume(small_fashion, tmp_path):
    assert quick_run(small_fashion, tmp_path) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lo')  # killed during the append
    assert quick_run(small_fashion, tmp_path, "--epochs", "2", "--resume", "auto") == 0
    assert [r["epoch"] for r in metrics_rows(tmp_path)] == [0, 1, 2]


def test_a_fresh_run_does_not_overwrite_an_earlier_one(small_fashion, tmp_path, capsys):
    assert quick_run(small_fashion, tmp_path) == 0
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert quick_run(small_fashion, tmp_path) == 2
    assert "already holds a run" in error_line(capsys) and (tmp_path / "metrics.jsonl").read_text() == metrics


def test_resuming_another_folders_checkpoint_does_not_overwrite_a_run(small_fashion, tmp_path, capsys):
    assert quick_run(small_fashion, tmp_path / "a") == 0
    assert quick_run(small_fashion, tmp_path / "b") == 0
    assert (
        quick_run(
            small_fashion, tmp_path / "b", "--epochs", "2", "--resume", str(tmp_path / "a" / "checkpoint_last.pth.tar")
        )
        == 2
    )
    assert "already holds a run" in error_line(capsys)
    assert (
        quick_run(
            small_fashion, tmp_path / "c", "--epochs", "2", "--resume", str(tmp_path / "a" / "checkpoint_last.pth.tar")
        )
        == 0
    )  # into an empty folder: a new run from it


def test_a_second_run_into_the_same_folder_is_refused(small_fashion, tmp_path):
    first = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--data",
            small_fashion,
            "--out",
            str(tmp_path),
            *QUICK,
            "--max-steps",
            "100",
            "--epochs",
            "50",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in first.stderr:
            if line.startswith("MoCo "):  # training: the folder is the first run's
                break
        second = subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "--data",
                small_fashion,
                "--out",
                str(tmp_path),
                *QUICK,
                "--resume",
                "auto",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"error: --out {tmp_path} is in use by another run (pid {first.pid}); wait "
            f"for it to end or choose another --out"
        )
    finally:
        first.kill()
        first.wait()


def test_a_cut_epoch_resumes_only_with_its_batch_size(small_fashion, tmp_path, capsys):
    stop_at(run_args(small_fashion, tmp_path, workers=0), 0, 4)
    args = run_args(small_fashion, tmp_path, workers=0, extra=["--resume", "auto"])
    args[args.index("--batch-size") + 1] = "32"
    assert train.main(args) == 2
    assert "was cut inside epoch 1 by a run with batch 16 on 1 ranks" in error_line(capsys)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_fashion, tmp_path, precision):
    """A NaN batch at step 13 of the first epoch; checkpoints every 5 steps. The run stops at its next check-in
    (step 15) with one line, and checkpoint_last still holds step 10 with finite weights."""
    args = run_args(
        small_fashion,
        tmp_path,
        workers=0,
        extra=["--checkpoint-steps", "5", "--print-freq", "5", "--precision", precision],
    )
    trainer = Trainer(parse_config(args))
    try:
        trainer.build()
        loader, iterate = trainer.loader, type(trainer.loader).__iter__

        def poisoned(self):
            for i, (im_q, im_k, labels) in enumerate(iterate(self)):
                yield (torch.full_like(im_q, float("nan")) if i == 12 else im_q), im_k, labels

        loader.__class__ = type("Poisoned", (type(loader),), {"__iter__": poisoned})
        with pytest.raises(TrainingDiverged) as diverged:
            trainer.run()
    finally:
        trainer.close()
    last = tmp_path / "checkpoint_last.pth.tar"
    assert str(diverged.value) == (
        f"the loss became non-finite at epoch 1, step 13 (lr {trainer.lr:.4g}); stopped "
        f"without saving the diverged weights: {last} (0 epochs and 10/100 steps of "
        f"epoch 1) is the last good checkpoint"
    )
    checkpoint = load_checkpoint(last)
    assert checkpoint["step"] == 10
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_a_diverging_run_exits_with_one_line(small_fashion, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--data",
            small_fashion,
            "--out",
            str(tmp_path),
            *QUICK,
            "--max-steps",
            "30",
            "--lr",
            "1e6",
            "--print-freq",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the loss became non-finite at epoch 1, step ")
    assert not (tmp_path / "checkpoint_last.pth.tar").exists()

"""Stop signals, as a user sends them: acknowledged at once, honoured without training on, and a second signal
never loses a checkpoint that was being written nor leaves a metrics row that no checkpoint backs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import metrics_rows

import engine.checkpoint
import train
from model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--batch-size",
    "32",
    "--moco-k",
    "128",
    "--image-size",
    "16",
    "--print-freq",
    "1",
    "--checkpoint-minutes",
    "0",
]


def test_ctrl_c_during_the_init_knn_pass_is_acknowledged_at_once_and_trains_no_step(tmp_path):
    """Ctrl-C (SIGINT to the process group) while the kNN monitor's workers extract the random init's features."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *SMALL,
            "--max-steps",
            "3",
            "--epochs",
            "5",
            "--workers",
            "1",
            "--knn-train-samples",
            "4000",
            "--knn-val-samples",
            "1000",
            "--image-size",
            "28",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not psutil.Process(process.pid).children():  # the kNN pass's loader workers: the pass has begun
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        first = process.stderr.readline()
        acknowledged = time.monotonic() - sent
        rest = process.communicate(timeout=120)[1].strip().splitlines()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert first.startswith("SIGINT: stopping after the current step or kNN pass, with a checkpoint"), first
    assert acknowledged < 2.0
    assert process.returncode == 130, rest
    last = tmp_path / "checkpoint_last.pth.tar"
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 0)  # no step was trained after the signal
    assert rest[-1] == f"interrupted: {last} holds epoch 0; continue with --resume {last}"
    assert [r["epoch"] for r in metrics_rows(tmp_path)] == [0]


def test_a_second_sigterm_while_the_epoch_checkpoint_is_prepared_keeps_it(tmp_path, monkeypatch, capsys):
    """Both signals land while the epoch's checkpoint is copied to host memory: the second one waits until the
    checkpoint is handed to the writer, the write is finished, and the line names it."""
    copy_to_host = engine.checkpoint.to_host
    sent = []

    def signalled_twice(obj):
        if not sent and isinstance(obj, dict) and obj.get("epoch") == 1:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return copy_to_host(obj)

    monkeypatch.setattr(engine.checkpoint, "to_host", signalled_twice)
    assert (
        train.main(
            [*SMALL, "--max-steps", "3", "--epochs", "5", "--workers", "0", "--knn-every", "0", "--out", str(tmp_path)]
        )
        == 130
    )
    last = tmp_path / "checkpoint_last.pth.tar"
    assert load_checkpoint(last)["epoch"] == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: {last} holds epoch 1; continue with --resume {last}"
    )
    assert [r["epoch"] for r in metrics_rows(tmp_path)] == [0, 1]


def test_two_sigterms_at_an_epoch_end_leave_no_row_without_its_checkpoint(tmp_path):
    """A scheduler's SIGTERM to the process group at the end of epoch 1, and another 0.2 s later: whatever the
    second one cuts, the last line names a checkpoint that holds what it says, and every metrics row has one."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *SMALL,
            "--arch",
            "resnet18",
            "--max-steps",
            "3",
            "--epochs",
            "50",
            "--workers",
            "1",
            "--knn-every",
            "0",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        for line in process.stderr:
            if line.startswith("epoch 1:"):
                os.killpg(process.pid, signal.SIGTERM)
                time.sleep(0.2)
                os.killpg(process.pid, signal.SIGTERM)
                break
        rest = process.communicate(timeout=120)[1].strip().splitlines()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, rest
    last = tmp_path / "checkpoint_last.pth.tar"
    epoch = load_checkpoint(last)["epoch"]
    assert rest[-1].startswith(f"interrupted: {last} holds epoch {epoch}; continue with --resume {last}"), rest
    assert max(r["epoch"] for r in metrics_rows(tmp_path)) == epoch
    assert not list(tmp_path.glob("*.tmp"))

"""Stopping and restarting several ranks: SIGTERM to every rank, and kill -9 of one rank of a two-node elastic
run. Both end with the weights of the run that was never stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import free_port

from model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def train_args(data, out, *extra):
    """Two epochs of 50 steps on two ranks (global batch 32); a checkpoint every 10 steps."""
    return [
        str(ROOT / "train.py"),
        "--data",
        data,
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--moco-k",
        "64",
        "--image-size",
        "16",
        "--workers",
        "1",
        "--knn-every",
        "0",
        "--print-freq",
        "5",
        "--checkpoint-minutes",
        "0",
        "--out",
        str(out),
        *extra,
    ]


def standalone(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *train_args(data, out, *extra),
    ]


def node(data, out, port, *extra):
    """One of two simulated nodes on this machine: c10d rendezvous, one rank each, one restart allowed."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "elastic-test",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.5",
        *train_args(data, out, *extra),
    ]


def start(command, own_store: bool = True) -> subprocess.Popen:
    # torchrun's shared rendezvous store keeps the last round's keys, so restarted ranks would wait for the dead
    # ones (pytorch/pytorch#135712); the README's torchrun lines set this too. One thread per rank in both launch
    # modes (torchrun sets it only for several ranks per node): float sums depend on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if own_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children() if "train.py" in " ".join(p.cmdline())]


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def finish(process: subprocess.Popen, timeout=240) -> str:
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def assert_same_weights(a: Path, b: Path):
    ca, cb = load_checkpoint(a / "checkpoint_last.pth.tar"), load_checkpoint(b / "checkpoint_last.pth.tar")
    assert (ca["epoch"], ca["step"]) == (cb["epoch"], cb["step"]) == (2, 0)
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key


@pytest.fixture(scope="module")
def never_stopped(small_fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("never_stopped")
    process = start(standalone(small_fashion, out))
    output = finish(process)
    assert process.returncode == 0, output[-3000:]
    return out


def test_sigterm_to_every_rank_stops_them_at_one_step_and_resumes_exactly(small_fashion, never_stopped, tmp_path):
    process = start(standalone(small_fashion, tmp_path))
    wait_for(lambda: (tmp_path / "checkpoint_last.pth.tar").exists())  # 10 steps in: both ranks are training
    ranks = ranks_of(process)
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    output = finish(process)
    last = tmp_path / "checkpoint_last.pth.tar"
    lines = [line for line in output.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and lines[0].endswith(f"; continue with --resume {last}"), output[-3000:]
    checkpoint = load_checkpoint(last)
    assert 0 < checkpoint["step"] < 50 or checkpoint["epoch"] == 1, lines
    assert [(r["epoch"], r["step"]) for r in checkpoint["ranks"]] == [(checkpoint["epoch"], checkpoint["step"])] * 2
    resumed = start(standalone(small_fashion, tmp_path, "--resume", "auto"))
    output = finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert_same_weights(never_stopped, tmp_path)


def test_kill_9_of_one_rank_is_an_elastic_restart_that_continues_exactly(small_fashion, never_stopped, tmp_path):
    port = free_port()
    nodes = [
        start(node(small_fashion, tmp_path, port, "--checkpoint-steps", "10", "--resume", "auto")) for _ in range(2)
    ]
    wait_for(lambda: (tmp_path / "checkpoint_last.pth.tar").exists())
    time.sleep(1.0)
    victim = ranks_of(nodes[1])
    assert len(victim) == 1
    victim[0].kill()
    outputs = [finish(n) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert any("resumed from" in o for o in outputs)
    assert_same_weights(never_stopped, tmp_path)


def test_restarts_under_torchruns_shared_store_are_refused_at_start(small_fashion, tmp_path):
    """torchrun's defaults (the shared rendezvous store) with --max-restarts: every rank refuses in one line before
    it joins a process group, each round ends at once, and nothing is trained or written."""
    port = free_port()
    started = time.monotonic()
    nodes = [start(node(small_fashion, tmp_path, port, "--resume", "auto"), own_store=False) for _ in range(2)]
    outputs = [finish(n, timeout=180) for n in nodes]
    assert all(n.returncode != 0 for n in nodes), "\n".join(o[-3000:] for o in outputs)
    assert time.monotonic() - started < 150
    refusal = (
        "error: torchrun --max-restarts with its shared rendezvous store hangs the restarted ranks "
        "(pytorch/pytorch#135712): launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    )
    assert all(refusal in o.splitlines() for o in outputs), "\n".join(o[-3000:] for o in outputs)
    assert not list(tmp_path.glob("checkpoint*")) and not (tmp_path / "metrics.jsonl").exists()

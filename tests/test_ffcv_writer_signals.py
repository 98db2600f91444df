"""The FFCV writer stopped by a signal mid-write, as a user stops it: one line, status 130 within seconds, no
process left behind, and neither a partial file under the output's name nor a leftover partial one."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.datasets import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split: a write of seconds, long enough to be stopped midway

pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")


class Stderr(threading.Thread):
    """Collects a process's stderr as it comes (FFCV's progress bar redraws itself with carriage returns)."""

    def __init__(self, process: subprocess.Popen):
        super().__init__(daemon=True)
        self.process, self.text = process, ""

    def run(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self.text += chunk.decode(errors="replace")

    def written(self) -> int:
        """Images the progress bar last reported as written."""
        counts = re.findall(rf"(\d+)/{TRAIN_IMAGES}", self.text)
        return int(counts[-1]) if counts else 0


# Ctrl-C in a terminal (SIGINT to the whole group: the workers get it too), a scheduler's SIGTERM to the writer
# alone (which then has to end the workers itself), and SIGINT to the writer alone (the same path as SIGTERM).
@pytest.mark.parametrize(
    "target, signum",
    [
        ("group", signal.SIGINT),
        ("parent", signal.SIGTERM),
        pytest.param("parent", signal.SIGINT, marks=pytest.mark.slow),
    ],
)
def test_a_signal_mid_write_stops_it_in_one_line_and_leaves_nothing(tmp_path, target, signum):
    """Each case is a writer's start-up (about 10 s of imports on 2 cores) and a few seconds of writing."""
    out = tmp_path / "train.beton"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.ffcv_writer", "fashion-mnist", str(out), "--workers", "2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    stderr = Stderr(process)
    stderr.start()
    try:
        deadline = time.monotonic() + 120
        while stderr.written() < 500:  # the workers are writing images
            assert time.monotonic() < deadline and process.poll() is None, stderr.text[-2000:]
            time.sleep(0.05)
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [f"train.beton.{process.pid}.partial"]
        writer = psutil.Process(process.pid)
        descendants = writer.children(recursive=True)  # the workers, and multiprocessing's resource tracker
        assert sum(child.cmdline() == writer.cmdline() for child in descendants) == 2
        if target == "group":
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
        sent = time.monotonic()
        process.wait(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stderr.join(timeout=10)
    assert stderr.written() < TRAIN_IMAGES, "the signal came after the write had finished"
    assert process.returncode == 130 and stopped_after < 10, (process.returncode, stopped_after)
    lines = stderr.text.strip().splitlines()
    assert lines[-1] == f"interrupted: nothing written to {out}", stderr.text[-2000:]
    assert not any(re.search("Traceback|KeyboardInterrupt|leaked", line) for line in lines), stderr.text[-3000:]
    assert list(tmp_path.iterdir()) == []
    assert not still_running(descendants, timeout=10)  # the resource tracker ends once its parent has


def still_running(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `processes` still running after `timeout` (a zombie, exited but not yet reaped, is not)."""
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)

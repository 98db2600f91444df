"""Checkpoints in the official MoCo layout, written atomically.

`{'epoch', 'arch', 'state_dict' (module.encoder_q.*, module.encoder_k.*, module.queue, module.queue_ptr),
'optimizer'}` is what the official main_lincls.py and detectron2 converter read. What an exact resumption
needs rides along: `config`, `scaler` (fp16), and for a checkpoint cut inside an epoch `step` (steps done in
epoch `epoch`, which counts finished epochs as officially) and `ranks` (each rank's RNG, loader state and
running loss sum). A checkpoint is written to a temporary file and renamed, so a crash never leaves a
truncated one behind; `CheckpointWriter` does that on a background thread.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

PREFIX = "module."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not a MoCo checkpoint."""


def save_checkpoint(state: dict, path: Path, *copies: Path) -> None:
    """Written to a temporary file, then renamed: an interrupted save leaves the previous checkpoint whole.
    `copies` get the same file (a hard link where the file system has them, so it is written once)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    copy_tmps = [Path(copy).with_name(Path(copy).name + ".tmp") for copy in copies]
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        for copy, copy_tmp in zip(copies, copy_tmps):
            copy_tmp.unlink(missing_ok=True)
            try:
                os.link(tmp, copy_tmp)
            except OSError:
                shutil.copyfile(tmp, copy_tmp)
            os.replace(copy_tmp, copy)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, *copy_tmps):
            leftover.unlink(missing_ok=True)
        raise


def to_host(obj):
    """A copy of `obj` (dicts, lists and tensors) on the host, no longer shared with the training that goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(value) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, so that training pays only for the copy to host memory
    (`to_host`), not for serialising and syncing a few hundred MB to disk. One write at a time; a failed write
    raises at the next `submit` or `wait`, and the interpreter waits for a write in progress before it exits."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, state: dict, path: Path, *copies: Path) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(state, path, *copies), name="checkpoint-writer")
        self.thread.start()

    def _write(self, state: dict, path: Path, *copies: Path) -> None:
        try:
            save_checkpoint(state, path, *copies)
        except BaseException as e:  # handed to the training thread at its next wait()
            self.error = e

    def failed(self, wait: bool = False) -> bool:
        """Whether the last write failed, so far (or, with `wait`, once it has ended); raises nothing."""
        if wait and self.thread is not None:
            self.thread.join()
        return self.error is not None

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise CheckpointError(f"writing a checkpoint failed: {error}") from error


def load_checkpoint(path) -> dict:
    """The checkpoint at `path`, or one clear CheckpointError saying why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason})") from None
    missing = {"epoch", "state_dict"} - set(ckpt) if isinstance(ckpt, dict) else {"epoch", "state_dict"}
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a MoCo checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def with_prefix(state_dict: dict) -> dict:
    """The official DDP key layout (`module.encoder_q.conv1.weight`), however the model was wrapped."""
    return {PREFIX + k: v for k, v in state_dict.items()}


def without_prefix(state_dict: dict) -> dict:
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state_dict.items()}


def query_encoder_state(state_dict: dict) -> dict:
    """The query encoder's weights as a plain torchvision state dict (the MoCo head `fc.*` dropped)."""
    body = "module.encoder_q."
    return {k[len(body):]: v for k, v in state_dict.items() if k.startswith(body) and not k.startswith(body + "fc")}

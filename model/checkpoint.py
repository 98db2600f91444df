"""Checkpoints in the official MoCo layout, written atomically.

`{'epoch', 'arch', 'state_dict' (module.encoder_q.*, module.encoder_k.*, module.queue, module.queue_ptr),
'optimizer'}` is what the official main_lincls.py and detectron2 converter read. What an exact resumption
needs rides along: `config`, `scaler` (fp16), and for a checkpoint cut inside an epoch `step` (steps done in
epoch `epoch`, which counts finished epochs as officially) and `ranks` (each rank's RNG, loader state and
running loss sum). A checkpoint is written to a temporary file and renamed, so a crash never leaves a
truncated one behind. The format lives here, below evaluation and engine, which both read it; the trainer's
background writer is engine/checkpoint.py.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

import torch

PREFIX = "module."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written, or is not a MoCo checkpoint."""


def check_writable(output: Path) -> None:
    """A path that cannot take a file fails in one line before any work is done for it."""
    if output.is_dir():
        raise CheckpointError(f"cannot write {output}: it is a folder; name a file in it")
    if not output.parent.is_dir():
        raise CheckpointError(f"cannot write {output}: the folder {output.parent} does not exist")


def write_atomically(path: Path, write: Callable[[BinaryIO], None], *copies: Path) -> None:
    """`write(file)` goes to a temporary file, synced, then renamed: an interrupted or failed write leaves the
    previous file whole and nothing partial behind. `copies` get the same file (a hard link where the file system
    has them, so it is written once). A failure of the OS is one CheckpointError naming the path and the OS's
    reason: torch reports a full disk as 'unexpected pos N vs M'."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    copy_tmps = [Path(copy).with_name(Path(copy).name + ".tmp") for copy in copies]
    try:
        with open(tmp, "wb") as f:
            write(f)
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
    except BaseException as e:
        for leftover in (tmp, *copy_tmps):
            leftover.unlink(missing_ok=True)
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise CheckpointError(f"writing {path} failed: {os.strerror(cause.errno).lower()}") from e


def os_error_behind(error: BaseException | None) -> OSError | None:
    """The OSError (with an errno) that `error` is or was raised while handling: torch's RuntimeError for a failed
    write keeps the file's OSError as its context."""
    while error is not None and not (isinstance(error, OSError) and error.errno):
        error = error.__cause__ or error.__context__
    return error


def save_checkpoint(state: dict, path: Path, *copies: Path) -> None:
    """`state` in torch's format at `path` (and `copies`), written atomically."""
    write_atomically(path, lambda f: torch.save(state, f), *copies)


# How torch.save's files begin: a zip archive, or (before torch 1.6) a pickle of torch's magic number.
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80\x02\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little"))


def load_checkpoint(path) -> dict:
    """The checkpoint at `path`, or one clear CheckpointError saying why it cannot be used. Only tensors and plain
    data are unpickled (weights_only); a file that holds anything else is refused as not ours, without torch's
    advice to unpickle it anyway."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            start = f.read(max(len(s) for s in TORCH_FILE_STARTS))
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {os.strerror(e.errno).lower()}") from None
    if not start.startswith(TORCH_FILE_STARTS):
        raise CheckpointError(
            f"{path} is not a checkpoint: torch.save did not write it (it is another kind of file, or corrupt)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to the user
        disallowed = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if disallowed:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain data ({disallowed[1]}): it is "
                "not a checkpoint this project wrote"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated") from None
    missing = {"epoch", "state_dict"} - set(ckpt) if isinstance(ckpt, dict) else {"epoch", "state_dict"}
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a MoCo checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def with_prefix(state_dict: dict) -> dict:
    """The official DDP key layout (`module.encoder_q.conv1.weight`), however the model was wrapped."""
    return {PREFIX + k: v for k, v in state_dict.items()}


def without_prefix(state_dict: dict) -> dict:
    return {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state_dict.items()}


def query_encoder_state(state_dict: dict) -> dict:
    """The query encoder's weights as a plain torchvision state dict (the MoCo head `fc.*` dropped)."""
    body = "module.encoder_q."
    return {k[len(body) :]: v for k, v in state_dict.items() if k.startswith(body) and not k.startswith(body + "fc")}

"""Checkpoints in the official MoCo layout, written atomically.

`{'epoch', 'arch', 'state_dict' (module.encoder_q.*, module.encoder_k.*, module.queue, module.queue_ptr),
'optimizer'}` is what the official main_lincls.py and detectron2 converter read; `scaler` and `config`
ride along for exact resumption. A checkpoint is written to a temporary file and renamed, so a crash
never leaves a truncated one behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PREFIX = "module."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not a MoCo checkpoint."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Written to a temporary file, then renamed: an interrupted save leaves the previous checkpoint whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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

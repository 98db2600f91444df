"""Export a MoCo checkpoint's query encoder for downstream use.

    python -m evaluation.export CKPT out.pth  --format torchvision   # loads into torchvision.models.<arch>
    python -m evaluation.export CKPT out.pkl  --format detectron2    # as the official converter writes it

The detectron2 layout is that of the official `detection/convert-pretrain-to-detectron2.py`, key for key.
"""

from __future__ import annotations

import argparse
import pickle as pkl
import sys
from functools import partial
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, check_writable, load_checkpoint, query_encoder_state, write_atomically


def to_detectron2(state_dict: dict) -> dict:
    """The official converter's renaming: stem, res2..res5, convN.norm, shortcut(.norm)."""
    model = {}
    for k, v in state_dict.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        model[k] = v.numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by train.py (or the official main_moco.py)")
    parser.add_argument("output", type=Path, help="file to write")
    parser.add_argument("--format", choices=("torchvision", "detectron2"), default="torchvision")
    args = parser.parse_args(argv)
    try:
        check_writable(args.output)
        state_dict = load_checkpoint(args.checkpoint)["state_dict"]
        if args.format == "torchvision":
            write_atomically(args.output, partial(torch.save, query_encoder_state(state_dict)))
        else:
            write_atomically(args.output, partial(pkl.dump, to_detectron2(state_dict)))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the query encoder of {args.checkpoint} to {args.output} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

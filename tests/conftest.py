import dataclasses
import gzip
import json
import os
import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(min(2, os.cpu_count() or 1))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (the MNIST format), gzipped: big-endian dims after a uint8 type code."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_mnist_subset(root: Path, train: int, val: int) -> str:
    """The first `train` / `val` images of the embedded Fashion-MNIST as a `fashion-mnist:DIR` data string."""
    from pipeline.datasets import FASHION_MNIST_FILES, resolve_dataset

    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        dataset = resolve_dataset("fashion-mnist", split, 28)
        images, labels = FASHION_MNIST_FILES[split]
        write_idx(root / f"{images}.gz", dataset.images[:count])
        write_idx(root / f"{labels}.gz", dataset.targets[:count])
    return f"fashion-mnist:{root}"


@pytest.fixture(scope="session")
def small_fashion(tmp_path_factory) -> str:
    """1,600 training and 256 validation images: 100 steps an epoch at batch 16."""
    return fashion_mnist_subset(tmp_path_factory.mktemp("fashion"), 1600, 256)


def _identity_recipe():
    """The aug+ recipe with every random op off: a loader then hands over the image itself, resized, normalised."""
    from pipeline.augs import get_recipe

    return dataclasses.replace(
        get_recipe("v2"),
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        flip_prob=0.0,
    )


IDENTITY = _identity_recipe()


def metrics_rows(out: Path) -> list[dict]:
    """OUT/metrics.jsonl, one dict per epoch (epoch 0: the random init)."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

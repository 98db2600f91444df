"""Datasets behind the loaders: an ImageFolder root (ImageNet layout) or the embedded Fashion-MNIST.

`data` strings accepted everywhere:
  - `fashion-mnist`            Debian's dataset-fashion-mnist under /usr/share/datasets/fashion-mnist
  - `fashion-mnist:/some/dir`  the same four IDX files elsewhere (gzipped or not)
  - `/path/to/root`            an ImageFolder root; `root/train` and `root/val` are used when present
"""

from __future__ import annotations

import collections
import functools
import gzip
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import find_classes, make_dataset

from pipeline.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# What counts as an image in an ImageFolder, for every loader: a file with one of these extensions (in any case).
# torchvision's IMG_EXTENSIONS and GIF, which PIL reads (its first frame) and DALI's decoder does not: the DALI
# loader refuses a dataset that holds GIFs in one line. Other files in the class folders are skipped with a notice.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Training images are the user's own files, not untrusted input, so PIL's decompression-bomb check (a warning from
# 89M pixels, an error from 179M) is replaced by one limit on what an image may cost a loader worker: 16384 x 16384
# pixels, 0.8 GB decoded as RGB. An image over it is a one-line DataError where PIL opens it (the torch loader, the
# evaluation data, the FFCV writer); DALI's decoder has no such limit.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = None

# Leading bytes of every image format PIL decodes (DALI: all but GIF), whatever the file's extension says: real
# ImageNet holds a PNG named .JPEG (train/n02105855/n02105855_2933.JPEG), and both decoders read it by its content.
GIF_MAGIC = b"GIF8"
IMAGE_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"P6",
    b"P3",
    b"P5",
    b"P2",
    b"BM",
    GIF_MAGIC,
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
    b"\x00\x00\x00\x0cjP  ",
)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): big-endian dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root} (apt-get install dataset-fashion-mnist)")


class FashionMNIST:
    """Fashion-MNIST as RGB PIL images of `image_size` pixels: the embedded default dataset."""

    def __init__(self, root: Path, split: str, image_size: int):
        images_stem, labels_stem = FASHION_MNIST_FILES[split]
        self.images = _read_idx(_find_idx(root, images_stem))
        self.targets = _read_idx(_find_idx(root, labels_stem)).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise DataError(
                f"Fashion-MNIST {split} in {root}: {len(self.images)} images but {len(self.targets)} labels"
            )
        self.image_size = image_size
        self.classes = [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        img = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        return img

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), int(self.targets[index])


class ImageFolderFiles:
    """An ImageFolder's (path, label) list, checked up front so bad files fail before training starts."""

    def __init__(self, root: Path, verify: bool = True):
        if not root.is_dir():
            raise DataError(f"data path {root} does not exist or is not a directory")
        self.classes, self.samples = _list_image_folder(root.resolve())
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        if verify:
            self.verify()

    def verify(self, indices=None) -> None:
        """Reads the first bytes of each image (all, or those at `indices`): a DataError naming the first file that
        is missing, empty or no image at all, before any training starts.

        One thread while files open fast (a local disk, a warm cache: ImageNet's 1.28M in seconds, where threads
        would only contend for the interpreter); 64 threads when the first files show a network file system's
        latency, which threads hide.
        """
        paths = [self.samples[i][0] for i in (range(len(self.samples)) if indices is None else indices)]
        probe, rest = paths[:PROBE_FILES], paths[PROBE_FILES:]
        start = time.perf_counter()
        _raise_first(map(_header_problem, probe))
        if rest and (time.perf_counter() - start) / len(probe) > SLOW_OPEN_S:
            with ThreadPoolExecutor(64) as pool:
                _raise_first(pool.map(_header_problem, rest, chunksize=256))
        else:
            _raise_first(map(_header_problem, rest))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"image {path} is {img.width}x{img.height} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS:,} (pipeline.datasets.MAX_IMAGE_PIXELS): shrink it"
                    )
                return to_rgb(img)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"unreadable image {path}: {e}") from None

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), int(self.targets[index])


PROBE_FILES, SLOW_OPEN_S = 1000, 50e-6

# PIL's modes that keep 16 bits per sample, and "I" (32-bit), in which older Pillows open 16-bit grayscale PNGs.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. 16-bit grayscale is scaled as DALI's decoder scales it, v -> round(v * 255 / 65535)
    = (v + 128) // 257, the whole 16-bit range onto the 8-bit one; PIL's own convert would clip every value over
    255, turning the image nearly white. (PIL opens 16-bit colour images at 8 bits itself, keeping the high byte:
    at most one level from that scaling.)"""
    if img.mode in SIXTEEN_BIT_MODES:
        samples = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((samples + 128) // 257).astype(np.uint8), mode="L")
    return img.convert("RGB")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def is_gif(path: str) -> bool:
    """By content, as decoders see a file, whatever its name."""
    with open(path, "rb") as f:
        return f.read(len(GIF_MAGIC)) == GIF_MAGIC


@functools.lru_cache(maxsize=8)
def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, (path, label) samples) of an ImageFolder, listed once per process: the training loader and the
    kNN monitor's memory bank read the same 1.28M-file tree.

    Labels are torchvision ImageFolder's: every class folder is a class, an empty one too, so that a split's labels
    match the other split's (train/ and val/ list the same classes). A notice names the class folders without
    images, and another counts the files skipped because they are no images (IMAGE_EXTENSIONS), by extension.
    """
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise DataError(f"data path {root} is empty: expected one sub-folder of images per class") from None
    skipped = collections.Counter()

    def keep_image(path: str) -> bool:
        if is_image_file(path):
            return True
        skipped[os.path.splitext(path)[1].lower() or "no extension"] += 1
        return False

    samples = make_dataset(str(root), class_to_idx, is_valid_file=keep_image, allow_empty=True)
    if not samples:
        raise DataError(f"data path {root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    if skipped:
        by_type = ", ".join(
            f"{extension} {count}" for extension, count in sorted(skipped.items(), key=lambda item: (-item[1], item[0]))
        )
        print(f"data path {root}: skipped {skipped.total()} files that are not images ({by_type})", file=sys.stderr)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        print(
            f"data path {root}: {len(empty)} of {len(classes)} class folders hold no images and still count as "
            f"classes: {', '.join(empty)}",
            file=sys.stderr,
        )
    return classes, samples


def _raise_first(problems) -> None:
    for problem in problems:
        if problem:
            raise DataError(f"unreadable image {problem}")


def _header_problem(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        head = os.read(fd, 16)
    except OSError as e:
        return f"{path}: {e.strerror}"
    finally:
        os.close(fd)
    if not head.startswith(IMAGE_MAGIC):
        return f"{path}: not an image file (no JPEG, PNG, BMP, GIF, TIFF, WebP, PNM or JPEG 2000 header)"
    return None


def resolve_dataset(data: str, split: str = "train", image_size: int = 224, verify: bool = True):
    """The dataset that `data` names, for `split` ('train' or 'val')."""
    if data == "fashion-mnist" or data.startswith("fashion-mnist:"):
        root = Path(data.partition(":")[2] or FASHION_MNIST_DIR)
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST directory {root} not found (apt-get install dataset-fashion-mnist)")
        return FashionMNIST(root, split, image_size)
    if not data:
        raise DataError("no data path given")
    root = Path(data)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if (root / "train").is_dir():
        return ImageFolderFiles(root / split, verify)
    if split != "train":
        raise DataError(
            f"data path {root} has no '{split}' folder for evaluation (expected {root}/train and {root}/{split})"
        )
    return ImageFolderFiles(root, verify)


def is_fashion_mnist(data: str) -> bool:
    return data == "fashion-mnist" or data.startswith("fashion-mnist:")

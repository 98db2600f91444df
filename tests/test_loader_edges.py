"""What real data and real scripts do to the loaders: ImageNet's PNG named .JPEG and its CMYK JPEGs, a script that
builds a loader at module level and just ends, a resumed epoch's order, and how long a batch's views stay valid."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import IDENTITY, requires_cuda
from PIL import Image

from pipeline import build_loader
from pipeline.augs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.ffcv_writer import write_beton

ROOT = Path(__file__).resolve().parents[1]
PNG_COLOUR, CMYK = (10, 200, 30), (0, 200, 30, 10)

# numba (0.68) raises a harmless KeyError while freeing FFCV's compiled functions when a loader is collected.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """Two solid images as ImageNet has them: a PNG named .JPEG (train/n02105855_2933.JPEG) and a CMYK JPEG."""
    root = tmp_path_factory.mktemp("odd")
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
    Image.new("RGB", (32, 32), PNG_COLOUR).save(root / "train" / "a" / "n02105855_2933.JPEG", "PNG")
    Image.new("CMYK", (32, 32), CMYK).save(root / "train" / "b" / "cmyk.JPEG", "JPEG")
    return root


def centre_rgb(view: torch.Tensor) -> list[int]:
    """The 0..255 colour at a view's centre, normalisation undone."""
    h, w = view.shape[-2:]
    return [
        round(((view[c, h // 2, w // 2].float() * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255).item()) for c in range(3)
    ]


def expected_colours() -> dict[int, list[int]]:
    """Class -> RGB as PIL converts it (the reference loader's decoder)."""
    return {0: list(PNG_COLOUR), 1: list(Image.new("CMYK", (1, 1), CMYK).convert("RGB").getpixel((0, 0)))}


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_png_named_jpeg_and_cmyk_jpeg_are_read(odd_folder, tmp_path, backend):
    data = str(odd_folder)
    if backend == "ffcv":
        data = str(tmp_path / "odd.beton")
        write_beton(str(odd_folder), data, compress_probability=0.0, workers=1)
    loader = build_loader(backend, data, batch_size=2, image_size=16, device="cpu", aug=IDENTITY, num_workers=1)
    im_q, _, labels = next(iter(loader))
    for view, label in zip(im_q, labels.tolist()):
        assert centre_rgb(view) == pytest.approx(expected_colours()[label], abs=2), (backend, label)


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pipeline import build_loader
loader = build_loader({backend!r}, {data!r}, batch_size=8, image_size=16, device="cpu", **{options!r})
im_q, im_k, labels = next(iter(loader))
print("read", tuple(im_q.shape))
"""


@pytest.mark.parametrize(
    "backend, options",
    [
        ("torch", {"num_workers": 2}),
        ("dali", {"num_workers": 2}),
        ("ffcv", {"num_workers": 2}),
        ("synthetic", {"steps": 4}),
    ],
)
def test_a_script_that_uses_a_loader_at_module_level_ends(small_fashion, tmp_path, backend, options):
    """No close(), no cleanup: the interpreter's own exit must end the workers and threads."""
    data = small_fashion
    if backend == "ffcv":
        data = str(tmp_path / "small.beton")
        write_beton(small_fashion, data, workers=1)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=str(ROOT), backend=backend, data=data, options=options))
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "read (8, 3, 16, 16)", result.stderr[-2000:]
    assert time.monotonic() - start < 60


def test_ffcv_resumed_epoch_reads_the_same_samples_in_the_same_order(small_fashion, tmp_path):
    """FFCV's crops cannot be seeded, so a resumed FFCV run is not bit-exact; its order is: from step s on, the
    same labels batch by batch as the uninterrupted epoch, and no sample before step s is read."""
    beton = str(tmp_path / "small.beton")
    write_beton(small_fashion, beton, workers=1)
    loader = build_loader("ffcv", beton, batch_size=64, image_size=16, device="cpu", num_workers=1, order="random")
    loader.set_epoch(3)
    whole = [labels.clone() for _, _, labels in loader]
    loader.set_epoch(3, 17)
    rest = [labels.clone() for _, _, labels in loader]
    assert len(whole) == len(loader) == 25 and len(rest) == 25 - 17
    assert all(torch.equal(a, b) for a, b in zip(whole[17:], rest))
    loader.set_epoch(3, 0)  # the start step applies to one epoch only
    assert len(list(loader)) == 25


@pytest.mark.parametrize(
    "backend, device", [("torch", "cpu"), ("dali", "cpu"), pytest.param("dali", "cuda", marks=requires_cuda)]
)
def test_a_batch_stays_valid_while_later_batches_are_read(small_fashion, backend, device):
    """DALI hands its output buffers to torch without a copy: a batch kept by the step must not be overwritten
    by the batches DALI prepares after it (prefetching, buffer reuse), nor its labels by DALI's next host batch.
    The reference loader owns its tensors."""
    loader = build_loader(backend, small_fashion, batch_size=16, image_size=16, device=device, num_workers=2)
    batches = iter(loader)
    first = next(batches)
    copies = [t.clone() for t in first]
    for _ in range(6):
        next(batches)
    assert all(torch.equal(kept, copy) for kept, copy in zip(first, copies))

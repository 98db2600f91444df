"""What counts as an image and how it is read, the same in every loader that reads an ImageFolder (torch, DALI, the
FFCV writer, the evaluation data): 16-bit PNGs scaled to 8 bits, GIFs, files that are no images, empty class
folders, and images over the pixel limit."""

import warnings

import cv2
import numpy as np
import pytest
import torch
from conftest import IDENTITY
from ffcv.reader import Reader
from PIL import Image

from evaluation.data import build_eval_loader
from pipeline import build_loader, datasets
from pipeline.augs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import DataError
from pipeline.ffcv_loader import field_values
from pipeline.ffcv_writer import IMAGE_FIELD, LABEL_FIELD, write_beton

SIDE = 16
LOADERS = ["torch", "dali", "ffcv-writer", "eval"]

# numba (0.68) raises a harmless KeyError while freeing FFCV's compiled functions when a loader is collected.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)


def read_images(loader: str, root, tmp_path) -> dict[int, list[np.ndarray]]:
    """Label -> the (H, W, 3) uint8 images that `loader` reads from the ImageFolder at `root`, un-augmented.

    torch and DALI: the identity recipe at the images' own size (a full crop, not resampled). The FFCV writer: the
    pixels it stored raw, read back from the file. Evaluation: resized to 1/0.875 of the crop, which for SIDE - 2
    is SIDE (no resampling), then centre-cropped: the images less a one-pixel border.
    """
    images = {}
    if loader == "ffcv-writer":
        beton = tmp_path / "images.beton"
        write_beton(str(root), beton, max_resolution=None, compress_probability=0.0, workers=1)
        reader = Reader(str(beton))
        content = beton.read_bytes()
        for field, label in zip(field_values(reader, IMAGE_FIELD), field_values(reader, LABEL_FIELD)):
            size = int(field["height"]) * int(field["width"]) * 3
            pixels = np.frombuffer(content, np.uint8, size, int(field["data_ptr"]))
            images.setdefault(int(label), []).append(pixels.reshape(int(field["height"]), int(field["width"]), 3))
        return images
    if loader == "eval":
        batches = build_eval_loader(
            str(root), "train", image_size=SIDE - 2, batch_size=1, device="cpu", num_workers=0
        )()
    else:
        built = build_loader(
            loader,
            str(root),
            batch_size=1,
            image_size=SIDE,
            device="cpu",
            aug=IDENTITY,
            num_workers=1 if loader == "dali" else 0,
        )
        batches = ((im_q, labels) for im_q, _, labels in built)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for views, labels in batches:
        for view, label in zip(views, labels.tolist()):
            pixels = ((view.float() * std + mean) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
            images.setdefault(label, []).append(pixels)
    return images


def expected(loader: str, image: np.ndarray) -> np.ndarray:
    """What `loader` should read from an (H, W, 3) image: all of it, or evaluation's centre crop."""
    return image[1:-1, 1:-1] if loader == "eval" else image


# --- 16-bit PNGs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sixteen_bit_folder(tmp_path_factory):
    """A 16-bit grayscale PNG (class 0) and a 16-bit RGB one (class 1), random samples over the whole range."""
    rng = np.random.default_rng(0)
    gray, rgb = (
        rng.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16),
        rng.integers(0, 65536, (SIDE, SIDE, 3), dtype=np.uint16),
    )
    root = tmp_path_factory.mktemp("sixteen")
    for name in ("gray", "rgb"):
        (root / name).mkdir()
    Image.fromarray(gray).save(root / "gray" / "gray.png")
    assert Image.open(root / "gray" / "gray.png").mode == "I;16"
    cv2.imwrite(str(root / "rgb" / "rgb.png"), rgb[:, :, ::-1])  # OpenCV writes BGR
    return root, np.repeat(gray[:, :, None], 3, axis=2), rgb


@pytest.mark.parametrize("loader", LOADERS)
def test_sixteen_bit_pngs_are_scaled_to_eight_bits(sixteen_bit_folder, tmp_path, loader):
    """v -> round(v * 255 / 65535), as DALI's decoder scales. PIL opens a 16-bit RGB PNG at 8 bits itself, taking
    the high byte: within one level of that."""
    root, gray, rgb = sixteen_bit_folder
    images = read_images(loader, root, tmp_path)
    scaled = {label: np.round(raw.astype(np.float64) * 255 / 65535) for label, raw in enumerate((gray, rgb))}
    np.testing.assert_array_equal(images[0][0], expected(loader, scaled[0]))
    colour_tolerance = 0 if loader == "dali" else 1
    np.testing.assert_allclose(images[1][0], expected(loader, scaled[1]), atol=colour_tolerance, rtol=0)


# --- GIFs, files that are no images, empty class folders -----------------------------------------------------------

GIF_COLOUR, PNG_COLOUR = (200, 40, 90), (10, 120, 250)


@pytest.fixture
def gif_folder(tmp_path):
    """A GIF (class 0, an animated one: its first frame is read) and a PNG (class 1)."""
    root = tmp_path / "gifs"
    for name in ("gif", "png"):
        (root / name).mkdir(parents=True)
    frames = [Image.new("RGB", (SIDE, SIDE), colour) for colour in (GIF_COLOUR, (0, 0, 0))]
    frames[0].save(root / "gif" / "a.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (SIDE, SIDE), PNG_COLOUR).save(root / "png" / "b.png")
    return root


@pytest.mark.parametrize("loader", ["torch", "ffcv-writer", "eval"])
def test_a_gif_is_an_image(gif_folder, tmp_path, loader):
    images = read_images(loader, gif_folder, tmp_path)
    for label, colour in enumerate((GIF_COLOUR, PNG_COLOUR)):
        assert len(images[label]) == 1
        np.testing.assert_array_equal(images[label][0], np.broadcast_to(colour, images[label][0].shape))


def test_dali_refuses_gifs_in_one_line(gif_folder):
    """DALI's decoder does not read GIF, so the DALI loader says so rather than failing in its pipeline."""
    with pytest.raises(DataError) as refused:
        build_loader("dali", str(gif_folder), batch_size=1, image_size=SIDE, device="cpu", num_workers=1)
    assert str(refused.value) == (
        f"the dali loader cannot decode GIF images and {gif_folder}/gif/a.gif is one: "
        f"convert them to PNG, or use --loader torch"
    )


def test_dali_names_a_gif_named_as_another_format(gif_folder):
    (gif_folder / "gif" / "a.gif").rename(gif_folder / "gif" / "a.png")
    loader = build_loader("dali", str(gif_folder), batch_size=1, image_size=SIDE, device="cpu", num_workers=1)
    with pytest.raises(DataError, match=f"cannot decode GIF images and {gif_folder}/gif/a.png is one"):
        list(loader)


@pytest.fixture
def untidy_folder(tmp_path):
    """Classes a, b, c, d: b holds no images (only notes), d nothing; a and c one PNG each, beside other files."""
    root = tmp_path / "untidy"
    for name in "abcd":
        (root / name).mkdir(parents=True)
    Image.new("RGB", (SIDE, SIDE), GIF_COLOUR).save(root / "a" / "1.PNG")
    Image.new("RGB", (SIDE, SIDE), PNG_COLOUR).save(root / "c" / "2.png")
    for path in ("a/notes.txt", "b/notes.txt", "c/labels.json", "c/README"):
        (root / path).write_text("not an image")
    return root


@pytest.mark.parametrize("loader", LOADERS)
def test_files_that_are_no_images_are_counted_and_empty_classes_named(untidy_folder, tmp_path, capfd, loader):
    """Every loader lists the folder alike: skipped files counted by type, empty class folders named and kept as
    classes, so an image's label is its folder's place among all class folders, as in torchvision's ImageFolder."""
    images = read_images(loader, untidy_folder, tmp_path)
    assert {label: len(found) for label, found in images.items()} == {0: 1, 2: 1}
    np.testing.assert_array_equal(images[2][0], np.broadcast_to(PNG_COLOUR, images[2][0].shape))
    notices = [line for line in capfd.readouterr().err.splitlines() if line.startswith(f"data path {untidy_folder}")]
    assert notices == [
        f"data path {untidy_folder}: skipped 4 files that are not images (.txt 2, .json 1, no extension 1)",
        f"data path {untidy_folder}: 2 of 4 class folders hold no images and still count as classes: b, d",
    ]


# --- the pixel limit -----------------------------------------------------------------------------------------------


def test_a_10000_pixel_square_image_loads_without_a_warning(tmp_path):
    """PIL warns from 89M pixels (DecompressionBombWarning) and refuses from 179M; training images may have up to
    datasets.MAX_IMAGE_PIXELS."""
    (tmp_path / "big").mkdir()
    Image.new("L", (10_000, 10_000), 77).save(tmp_path / "big" / "big.jpg")
    dataset = datasets.resolve_dataset(str(tmp_path), "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = dataset.load(0)
    assert image.size == (10_000, 10_000) and image.getpixel((5_000, 5_000)) == (77, 77, 77)


def test_an_image_over_the_pixel_limit_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "c").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "c" / "fits.png")
    Image.new("RGB", (11, 10)).save(tmp_path / "c" / "over.png")
    loader = build_loader("torch", str(tmp_path), batch_size=2, image_size=SIDE, device="cpu", num_workers=0)
    with pytest.raises(DataError) as refused:
        next(iter(loader))
    assert str(refused.value) == (
        f"image {tmp_path}/c/over.png is 11x10 pixels, over the limit of 100 "
        f"(pipeline.datasets.MAX_IMAGE_PIXELS): shrink it"
    )

"""The FFCV writer and loader: round trips, the loader contract, sharding, bad files, and augmentation
statistics against the reference torch loader.

The test images make every view measurable: red is the source x coordinate (one level per pixel), green the y
coordinate, blue encodes the sample index. So a view tells which sample it came from, whether it was flipped
(red falls left to right), how large its crop was (the red and green spans), and whether it is gray (all
channels equal). FFCV compiles its pipeline (about 10-20 s per loader), so the two loaders are built once.
"""

from __future__ import annotations

import gc
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from ffcv.fields import FloatField, IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.writer import DatasetWriter
from PIL import Image
from scipy import stats

from pipeline import build_loader, ffcv_writer
from pipeline.augs import get_recipe
from pipeline.common import steps_per_epoch
from pipeline.datasets import FASHION_MNIST_DIR, resolve_dataset
from pipeline.errors import DataError
from pipeline.ffcv_loader import field_values
from pipeline.ffcv_writer import IMAGE_FIELD, LABEL_FIELD, write_beton
from pipeline.torch_loader import ShardSampler

CLASSES, PER_CLASS = 4, 25
IMAGES = CLASSES * PER_CLASS
WIDTH, HEIGHT = 256, 192
SIZE, BATCH, EPOCHS = 32, 25, 5  # 5 epochs x 100 images x 2 views = 1,000 views per loader
BLUE_OFFSET, BLUE_STEP = 20, 2
ALPHA = 1e-4  # FFCV's crops cannot be seeded, so its statistical checks may fail about 1 in 10,000 runs

# numba (0.68) raises a harmless KeyError while freeing FFCV's compiled functions when a loader is collected.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)

# Crop, flip and grayscale at values unlike the defaults, so a loader that ignores the recipe fails; no jitter
# or blur, so the coordinates survive.
RECIPE = replace(
    get_recipe("v2"), crop_scale=(0.3, 0.9), flip_prob=0.3, grayscale_prob=0.3, jitter_prob=0.0, blur_prob=0.0
)


@pytest.fixture(scope="module", autouse=True)
def collect_loaders_here():
    """FFCV loaders live in reference cycles: collect them before the next module, so their noise stays here."""
    yield
    gc.collect()


def coordinate_image(index: int) -> Image.Image:
    x = np.broadcast_to(np.arange(WIDTH), (HEIGHT, WIDTH))
    y = np.broadcast_to(np.round(np.arange(HEIGHT) * 255 / (HEIGHT - 1))[:, None], (HEIGHT, WIDTH))
    blue = np.full((HEIGHT, WIDTH), BLUE_OFFSET + BLUE_STEP * index)
    return Image.fromarray(np.stack([x, y, blue], axis=-1).astype(np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """100 lossless (PNG) coordinate images, sample i in class i // 25, in ImageFolder order."""
    root = tmp_path_factory.mktemp("coordinates")
    for index in range(IMAGES):
        folder = root / f"class_{index // PER_CLASS}"
        folder.mkdir(exist_ok=True)
        coordinate_image(index).save(folder / f"img_{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def raw_beton(image_folder, tmp_path_factory) -> Path:
    """The same images, stored raw at full resolution: exactly the pixels the torch loader reads."""
    out = tmp_path_factory.mktemp("beton") / "coordinates.beton"
    write_beton(str(image_folder), out, max_resolution=None, compress_probability=0.0, workers=2)
    return out


@dataclass
class Views:
    """What one loader yielded over EPOCHS epochs, back in [0, 255] pixel values."""

    steps: int
    batches_per_epoch: list[int]
    first_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    q: np.ndarray  # (epochs * images, 3, SIZE, SIZE)
    k: np.ndarray
    labels: np.ndarray  # (epochs * images,)

    @property
    def all(self) -> np.ndarray:
        return np.concatenate([self.q, self.k])


def unnormalise(x: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(RECIPE.mean).view(1, 3, 1, 1), torch.tensor(RECIPE.std).view(1, 3, 1, 1)
    return ((x.float().cpu() * std + mean) * 255).numpy()


def collect(loader) -> Views:
    batches, counts = [], []
    for _ in range(EPOCHS):
        epoch = list(loader)
        counts.append(len(epoch))
        batches += epoch
    q, k, labels = zip(*batches)
    return Views(
        len(loader), counts, batches[0], unnormalise(torch.cat(q)), unnormalise(torch.cat(k)), torch.cat(labels).numpy()
    )


@pytest.fixture(scope="module", params=["once", "twice"], ids=lambda decode: f"decode-{decode}")
def ffcv_views(raw_beton, request) -> Views:
    loader = build_loader(
        "ffcv",
        str(raw_beton),
        batch_size=BATCH,
        image_size=SIZE,
        device="cpu",
        aug=RECIPE,
        num_workers=2,
        decode=request.param,
    )
    return collect(loader)


@pytest.fixture(scope="module")
def torch_views(image_folder) -> Views:
    loader = build_loader(
        "torch", str(image_folder), batch_size=BATCH, image_size=SIZE, device="cpu", aug=RECIPE, num_workers=0
    )
    return collect(loader)


# --- measuring views -------------------------------------------------------------------------------------


def is_gray(views: np.ndarray) -> np.ndarray:
    return np.abs(views.max(axis=1) - views.min(axis=1)).max(axis=(1, 2)) < 1.0


def sample_index(views: np.ndarray) -> np.ndarray:
    """The sample each (non-gray) view came from, read from its constant blue channel."""
    return np.round((views[:, 2].mean(axis=(1, 2)) - BLUE_OFFSET) / BLUE_STEP).astype(int)


def red_span(views: np.ndarray) -> np.ndarray:
    """Signed change of red (source x) between the second and the second-to-last column, averaged over rows.

    Inner columns, because at the border PIL's antialiasing filter is cut off and leans inwards."""
    return (views[:, 0, :, -2] - views[:, 0, :, 1]).mean(axis=1)


def crop_area_fraction(views: np.ndarray) -> np.ndarray:
    """The crop's share of the source area: red and green spans between inner pixel centres, scaled back."""
    inner = SIZE / (SIZE - 3)
    width = np.abs(red_span(views)) * inner
    height = (views[:, 1, -2, :] - views[:, 1, 1, :]).mean(axis=1) * inner * (HEIGHT - 1) / 255
    return width * height / (WIDTH * HEIGHT)


def assert_rates_agree(hits_a: np.ndarray, hits_b: np.ndarray, expected: float) -> None:
    """Both rates near the recipe's probability (4.5 standard errors) and not different from each other."""
    for hits in (hits_a, hits_b):
        assert abs(hits.mean() - expected) < 4.5 * np.sqrt(expected * (1 - expected) / len(hits)), hits.mean()
    table = [[hits_a.sum(), (~hits_a).sum()], [hits_b.sum(), (~hits_b).sum()]]
    assert stats.fisher_exact(table).pvalue > ALPHA


# --- writer ----------------------------------------------------------------------------------------------


def test_writer_round_trip_keeps_images_labels_and_resolution(image_folder, tmp_path):
    out = tmp_path / "jpeg.beton"
    report = write_beton(str(image_folder), out, max_resolution=128, compress_probability=1.0, workers=2)
    reader = Reader(str(out))
    images = field_values(reader, IMAGE_FIELD)
    assert report.images == reader.num_samples == IMAGES and report.size_bytes == out.stat().st_size
    np.testing.assert_array_equal(field_values(reader, LABEL_FIELD), np.arange(IMAGES) // PER_CLASS)
    assert (images["width"] == 128).all() and (images["height"] == 96).all()  # longer side capped, aspect kept
    assert (images["mode"] == 0).all()  # all JPEG


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_writer_round_trip_fashion_mnist(tmp_path):
    out = tmp_path / "fashion-mnist-val.beton"
    write_beton("fashion-mnist", out, split="val", workers=2)
    reader = Reader(str(out))
    expected = resolve_dataset("fashion-mnist", "val").targets
    np.testing.assert_array_equal(field_values(reader, LABEL_FIELD), expected)
    images = field_values(reader, IMAGE_FIELD)
    assert (images["width"] == 28).all() and (images["height"] == 28).all()


def test_writer_refuses_an_unreadable_image_and_leaves_no_file(image_folder, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(image_folder / "class_0", root / "class_0")
    jpeg = root / "class_0" / "truncated.jpg"
    coordinate_image(0).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # a valid JPEG header, then nothing
    out = tmp_path / "bad.beton"
    with pytest.raises(DataError, match="truncated.jpg"):
        write_beton(str(root), out, workers=2)
    assert not out.exists()


class DyingDataset:
    """Small images; the writer worker that reads sample 5 exits at once, the first `deaths` times."""

    def __init__(self, marker_dir: Path, deaths: int):
        self.marker_dir, self.deaths = marker_dir, deaths

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        if index == 5:
            died = len(list(self.marker_dir.iterdir()))
            if died < self.deaths:
                (self.marker_dir / str(died)).touch()
                os._exit(1)
        return np.full((8, 8, 3), index, dtype=np.uint8), index % 4


@pytest.mark.parametrize("deaths", [1, 2])
def test_writer_survives_a_dead_worker_once_and_never_hangs(tmp_path, monkeypatch, deaths):
    """FFCV's writer waits forever for a dead worker's samples; ours retries once, then fails in one line."""
    markers = tmp_path / "deaths"
    markers.mkdir()
    monkeypatch.setattr(ffcv_writer, "resolve_dataset", lambda *args, **kwargs: DyingDataset(markers, deaths))
    monkeypatch.setattr(ffcv_writer, "WORKERS_GONE_GRACE_S", 1.0)
    out = tmp_path / "dying.beton"
    if deaths == 2:
        with pytest.raises(DataError, match="workers died twice"):
            write_beton("unused", out, max_resolution=None, compress_probability=0.0, workers=2)
        assert not out.exists()
        return
    report = write_beton("unused", out, max_resolution=None, compress_probability=0.0, workers=2)
    assert report.images == 40 and len(list(markers.iterdir())) == 1
    np.testing.assert_array_equal(np.sort(field_values(Reader(str(out)), LABEL_FIELD)), np.sort(np.arange(40) % 4))


# --- bad .beton files ------------------------------------------------------------------------------------


def build_ffcv(path: Path):
    return build_loader("ffcv", str(path), batch_size=BATCH, image_size=SIZE, device="cpu")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_ffcv(tmp_path / "missing.beton")


@pytest.mark.parametrize("damage", ["empty", "random bytes", "truncated"])
def test_corrupt_file_is_a_data_error(raw_beton, tmp_path, damage):
    content = raw_beton.read_bytes()
    damaged = {
        "empty": b"",
        "random bytes": np.random.default_rng(0).bytes(100_000),
        "truncated": content[: len(content) // 2],
    }[damage]
    path = tmp_path / "damaged.beton"
    path.write_bytes(damaged)
    with pytest.raises(DataError, match="damaged.beton"):
        build_ffcv(path)


def test_unknown_decode_strategy(raw_beton):
    with pytest.raises(ValueError, match="decode strategy 'thrice'; choose one of: once, twice"):
        build_loader("ffcv", str(raw_beton), batch_size=BATCH, image_size=SIZE, device="cpu", decode="thrice")


@pytest.mark.parametrize(
    "fields", [{"image": RGBImageField(), "target": IntField()}, {"image": RGBImageField(), "label": FloatField()}]
)
def test_wrong_fields_are_a_data_error(tmp_path, fields):
    path = tmp_path / "foreign.beton"
    samples = [(np.zeros((8, 8, 3), dtype=np.uint8), 1)] * 4
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(samples)
    with pytest.raises(DataError, match="expected image"):
        build_ffcv(path)


# --- the loader contract ---------------------------------------------------------------------------------


def test_contract_shapes_dtype_layout_device_and_values(ffcv_views):
    im_q, im_k, labels = ffcv_views.first_batch
    assert ffcv_views.steps == steps_per_epoch(IMAGES, BATCH, 1)
    assert ffcv_views.batches_per_epoch == [ffcv_views.steps] * EPOCHS  # re-iterable, last partial batch dropped
    for view in (im_q, im_k):
        assert view.shape == (BATCH, 3, SIZE, SIZE) and view.dtype == torch.float32
        assert view.device.type == "cpu" and view.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (BATCH,) and labels.dtype == torch.int64
    pixels = ffcv_views.all
    assert pixels.min() > -0.01 and pixels.max() < 255.01  # normalised with the recipe's mean and std


def test_contract_labels_and_view_pairs_match_their_image(ffcv_views):
    q, k, labels = ffcv_views.q, ffcv_views.k, ffcv_views.labels
    q_known, k_known = ~is_gray(q), ~is_gray(k)
    q_index, k_index = sample_index(q), sample_index(k)
    np.testing.assert_array_equal(labels[q_known], q_index[q_known] // PER_CLASS)
    np.testing.assert_array_equal(labels[k_known], k_index[k_known] // PER_CLASS)
    both = q_known & k_known
    np.testing.assert_array_equal(q_index[both], k_index[both])  # the two views are of one image
    # ...cropped independently: the crops' areas differ (equal only for two crops of scale 1, impossible here)
    different = np.abs(crop_area_fraction(q[both]) - crop_area_fraction(k[both])) > 1e-3
    assert different.mean() > 0.95
    for epoch in np.split(np.where(q_known, q_index, np.where(k_known, k_index, -1)), EPOCHS):
        seen = epoch[epoch >= 0]
        assert len(np.unique(seen)) == len(seen), "a sample came twice in one epoch"


def test_ranks_read_disjoint_shards_of_the_reference_permutation(raw_beton):
    """Rank 1 of 2 reads exactly the torch loader's rank-1 shard, epoch by epoch, set_epoch included."""
    world, seed, batch = 2, 5, 10
    loader = build_loader(
        "ffcv",
        str(raw_beton),
        batch_size=batch,
        image_size=16,
        device="cpu",
        rank=1,
        world_size=world,
        seed=seed,
        aug=replace(RECIPE, grayscale_prob=0.0),
        num_workers=2,
    )
    assert len(loader) == steps_per_epoch(IMAGES, batch, world)
    loader.set_epoch(3)
    for epoch in (3, 4):
        seen = np.concatenate([sample_index(unnormalise(q)) for q, _, _ in loader])
        shards = []
        for rank in range(world):
            sampler = ShardSampler(IMAGES, rank, world, seed)
            sampler.epoch = epoch
            shards.append([index for index, _ in sampler])
        assert not set(shards[0]) & set(shards[1])
        np.testing.assert_array_equal(seen, shards[1][: len(loader) * batch])


# --- augmentation statistics against the reference -------------------------------------------------------


def test_grayscale_rate_matches_reference(ffcv_views, torch_views):
    assert_rates_agree(is_gray(ffcv_views.all), is_gray(torch_views.all), RECIPE.grayscale_prob)


def test_flip_rate_matches_reference(ffcv_views, torch_views):
    flipped = [red_span(v.all[~is_gray(v.all)]) < 0 for v in (ffcv_views, torch_views)]
    assert_rates_agree(*flipped, RECIPE.flip_prob)


def test_crop_area_distribution_matches_reference(ffcv_views, torch_views):
    areas = [crop_area_fraction(v.all[~is_gray(v.all)]) for v in (ffcv_views, torch_views)]
    for area in areas:
        low, high = RECIPE.crop_scale
        assert low - 0.015 < area.min() and area.max() < high + 0.015
    assert stats.ks_2samp(*areas).pvalue > ALPHA


@pytest.mark.gpu
@requires_cuda
def test_contract_on_cuda(raw_beton):
    loader = build_loader(
        "ffcv",
        str(raw_beton),
        batch_size=BATCH,
        image_size=SIZE,
        device="cuda",
        aug="v2",
        dtype=torch.bfloat16,
        num_workers=2,
    )
    im_q, im_k, labels = next(iter(loader))
    for view in (im_q, im_k):
        assert view.device.type == "cuda" and view.dtype == torch.bfloat16
        assert view.shape == (BATCH, 3, SIZE, SIZE) and view.is_contiguous(memory_format=torch.channels_last)
    assert labels.device.type == "cuda" and labels.dtype == torch.int64

"""The DALI loader: the loader contract, its ops against torchvision's, and its augmentation statistics against the
reference loader's. CPU mode everywhere (the same graph as on the GPU); GPU-only features run where there is one."""

import dataclasses
import gc
import io
import threading
import weakref

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms.functional as F
from conftest import IDENTITY, requires_cuda
from nvidia.dali import fn, pipeline_def
from nvidia.dali.tensors import TensorListGPU
from PIL import Image, ImageFilter
from scipy import stats

from benchmarks.tools.imagenet_like import generate
from pipeline import build_loader, dali_loader
from pipeline.augs import IMAGENET_MEAN, IMAGENET_STD, get_recipe
from pipeline.datasets import FASHION_MNIST_DIR, resolve_dataset
from pipeline.errors import DataError
from pipeline.torch_loader import ShardSampler

V2 = get_recipe("v2")
CROP_AND_FLIP = dataclasses.replace(V2, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

# Each image of `indexed_folder` is one flat colour that spells its index (R, G) and its class (B).
INDEXED_IMAGES, INDEXED_CLASSES = 52, 4
COORD_SIZE = (64, 48)  # width, height of the coordinate images


def index_colour(index: int) -> tuple[int, int, int]:
    return 16 * (index % 16) + 8, 16 * (index // 16) + 8, 64 * (index % INDEXED_CLASSES) + 32


def dali(data, **options):
    options = {"batch_size": 8, "image_size": 16, "device": "cpu", "num_workers": 2, **options}
    return build_loader("dali", str(data), **options)


def pixels(views: torch.Tensor) -> torch.Tensor:
    """Normalised views back to 0-255 floats."""
    return (views.float().cpu() * STD + MEAN) * 255


@pytest.fixture(scope="module")
def indexed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    for index in range(INDEXED_IMAGES):
        folder = root / f"class{index % INDEXED_CLASSES}"
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (24, 20), index_colour(index)).save(folder / f"{index:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("photos"), 32, classes=4, show_progress=False)


@pytest.fixture(scope="module")
def coordinate_folder(tmp_path_factory):
    """R is the column, G the row (0-255 across the image), B constant: a crop's box and flip can be read back."""
    root = tmp_path_factory.mktemp("coordinates")
    (root / "all").mkdir()
    width, height = COORD_SIZE
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    image = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=2).round().astype(np.uint8))
    for i in range(128):
        image.save(root / "all" / f"{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def square_photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("square")
    (root / "all").mkdir()
    photo = Image.fromarray(skimage.data.astronaut()).resize((48, 48))
    for i in range(128):
        photo.save(root / "all" / f"{i:03d}.jpg", quality=95)
    return root


def decode_indices(views: torch.Tensor) -> list[int]:
    rgb = pixels(views).mean(dim=(2, 3))
    return [int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16)) for r, g, _ in rgb.tolist()]


def epoch_indices(loader) -> list[int]:
    return [i for im_q, _, _ in loader for i in decode_indices(im_q)]


# --- the contract ---


@pytest.mark.parametrize("decode", ["once", "roi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contract_on_photos(photo_folder, decode, dtype):
    loader = dali(photo_folder, batch_size=8, image_size=32, dtype=dtype, decode=decode)
    batches = list(loader)
    assert len(loader) == len(batches) == 32 // 8
    low = (0 - MEAN) / STD
    high = (1 - MEAN) / STD
    for im_q, im_k, labels in batches:
        for view in (im_q, im_k):
            assert view.shape == (8, 3, 32, 32) and view.dtype == dtype and view.device.type == "cpu"
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert (view.float() >= low - 1e-2).all() and (view.float() <= high + 1e-2).all()
        assert labels.dtype == torch.int64 and labels.shape == (8,) and labels.device.type == "cpu"
        assert all(not torch.equal(q, k) for q, k in zip(im_q, im_k))  # two independent views


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_values_and_labels_match_the_files(indexed_folder, dtype, device):
    loader = dali(indexed_folder, aug=CROP_AND_FLIP, dtype=dtype, device=device)
    for im_q, im_k, labels in loader:
        assert im_q.device.type == im_k.device.type == labels.device.type == device
        for view in (im_q, im_k):
            for image, index, label in zip(view.float().cpu(), decode_indices(view), labels.tolist()):
                colour = torch.tensor(index_colour(index), dtype=torch.float32).view(3, 1, 1) / 255
                expected = ((colour - MEAN[0]) / STD[0]).expand_as(image)
                torch.testing.assert_close(image, expected, atol=0.05, rtol=0)  # JPEG: within 3 levels
                assert label == index % INDEXED_CLASSES


def test_the_last_epochs_pipeline_is_released_before_the_next_is_built(photo_folder):
    """Two pipelines (and on a GPU two sets of decoder buffers) are never alive at once: after a whole epoch, after
    one left early and closed, and after one left early and abandoned. By reference counting alone: the cyclic
    garbage collector, which would hide a reference cycle keeping a pipeline alive, is off."""
    loader = dali(photo_folder, batch_size=8, image_size=16)
    built, alive_at_build = [], []
    original = type(loader).pipeline

    def pipeline(self, *args):
        alive_at_build.append(sum(ref() is not None for ref in built))
        pipe = original(self, *args)
        built.append(weakref.ref(pipe))
        return pipe

    loader.pipeline = pipeline.__get__(loader)
    gc.disable()
    try:
        assert len(list(loader)) == len(loader)
        closed = iter(loader)
        next(closed)
        closed.close()
        abandoned = iter(loader)
        next(abandoned)
        assert len(list(loader)) == len(loader)
    finally:
        gc.enable()
    assert alive_at_build == [0, 0, 0, 0] and sum(ref() is not None for ref in built) == 1


def test_cpu_labels_are_the_datasets_as_int64(indexed_folder):
    loader = dali(indexed_folder, seed=5)
    labels = torch.cat([labels for _, _, labels in loader])
    shard = dali_loader.epoch_batches_shard(len(loader.dataset), 8, 0, 1, 5, 0)
    assert labels.dtype == torch.int64 and labels.device.type == "cpu"
    assert labels.tolist() == loader.dataset.targets[shard].tolist()


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("decode, decoder", [("once", "image"), ("roi", "image_random_crop")])
def test_decoder_preallocation_goes_to_the_mixed_decoder_only(photo_folder, monkeypatch, gpu, decode, decoder):
    """DALI's ResNet-50 ImageNet example's preallocation is the default; the CPU decoder takes none of it. The
    graph is only defined here, not built, so the mixed decoder's arguments can be read without a GPU."""
    options = dali(photo_folder).decoder_options
    assert options == dict(
        hw_decoder_load=0.65,
        device_memory_padding=211025920,
        host_memory_padding=140544512,
        preallocate_width_hint=5980,
        preallocate_height_hint=6430,
    )
    calls = []
    real = getattr(fn.decoders, decoder)
    monkeypatch.setattr(fn.decoders, decoder, lambda *args, **kwargs: (calls.append(kwargs), real(*args, **kwargs))[1])

    @pipeline_def(batch_size=1, num_threads=1, device_id=0 if gpu else None)
    def graph():
        jpegs, _ = fn.readers.file(files=[str(next(photo_folder.rglob("*.jpg")))], labels=[0])
        return tuple(dali_loader.jpeg_views(jpegs, get_recipe("v2"), 16, gpu, decode, options))

    graph()
    assert len(calls) == (2 if decode == "roi" else 1)
    for call in calls:
        assert call["device"] == ("mixed" if gpu else "cpu")
        assert {k: call[k] for k in options if k in call} == (options if gpu else {})


def test_ranks_read_the_reference_shards(indexed_folder):
    """Two ranks: disjoint shards covering the dataset less each rank's dropped partial batch, and exactly the
    images, in the same order, that the reference loader gives each rank."""
    shards = []
    for rank in range(2):
        loader = dali(indexed_folder, aug=CROP_AND_FLIP, rank=rank, world_size=2, seed=3)
        reference = build_loader(
            "torch",
            str(indexed_folder),
            batch_size=8,
            image_size=16,
            device="cpu",
            aug=CROP_AND_FLIP,
            rank=rank,
            world_size=2,
            seed=3,
            num_workers=0,
        )
        assert len(loader) == (INDEXED_IMAGES // 2) // 8 == 3
        shards.append(epoch_indices(loader))
        assert shards[-1] == epoch_indices(reference)
    assert len(shards[0]) == len(shards[1]) == 24 and not set(shards[0]) & set(shards[1])


def test_seed_reproduces_and_epochs_reshuffle(indexed_folder, photo_folder):
    first, again = dali(photo_folder, seed=7), dali(photo_folder, seed=7)
    for (q1, k1, y1), (q2, k2, y2) in zip(first, again):
        assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(y1, y2)
    assert not torch.equal(next(iter(dali(photo_folder, seed=8)))[0], next(iter(dali(photo_folder, seed=7)))[0])

    loader = dali(indexed_folder, seed=7)
    epoch0, epoch1 = epoch_indices(loader), epoch_indices(loader)  # iterating again moves to the next epoch
    loader.set_epoch(0)
    assert epoch0 != epoch1 and epoch_indices(loader) == epoch0


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "content", [b"\xff\xd8\xff\xe0" + b"not a JPEG body" * 50, truncated_jpeg()], ids=["garbage", "truncated"]
)
def test_a_file_that_fails_to_decode_is_named(tmp_path, device, content):
    """Its header passes the up-front check; DALI's decoder fails on it, and the loader names it."""
    (tmp_path / "class").mkdir()
    for i in range(15):
        Image.new("RGB", (20, 20), (16 * i, 0, 0)).save(tmp_path / "class" / f"ok{i}.jpg")
    (tmp_path / "class" / "bad.jpg").write_bytes(content)
    errors = []

    def read_one_epoch():  # 16 images, two batches of 8: every file is read
        try:
            list(dali(tmp_path, batch_size=8, device=device))
        except DataError as error:
            errors.append(error)

    reader = threading.Thread(target=read_one_epoch, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the loader hung on a corrupt file"
    assert len(errors) == 1 and "bad.jpg" in str(errors[0])


def test_a_file_with_a_wrong_header_is_named_up_front(tmp_path):
    (tmp_path / "class").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "class" / "ok.jpg")
    (tmp_path / "class" / "fake.jpg").write_text("not an image")
    with pytest.raises(DataError, match="fake.jpg"):
        dali(tmp_path, batch_size=1)


def test_options_are_checked(photo_folder):
    with pytest.raises(ValueError, match="decode strategy"):
        dali(photo_folder, decode="twice")
    with pytest.raises(ValueError, match="float64"):
        dali(photo_folder, dtype=torch.float64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of machines without CUDA")
def test_cuda_without_a_gpu_falls_back_to_cpu_with_a_notice(photo_folder, capsys):
    im_q, _, labels = next(iter(dali(photo_folder, device="cuda")))
    assert im_q.device.type == labels.device.type == "cpu"
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "CUDA is not available" in notice[0]


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
@pytest.mark.parametrize("device", DEVICES)
def test_fashion_mnist_reads_the_reference_shards(device):
    """Uncropped views are the IDX pixels themselves, grey in three channels, of the images the reference sampler
    gives each rank, in its order, with their labels."""
    dataset = resolve_dataset("fashion-mnist", "train", 28)
    for rank in range(2):
        im_q, _, labels = next(
            iter(dali("fashion-mnist", image_size=28, device=device, aug=IDENTITY, rank=rank, world_size=2, seed=1))
        )
        indices = [i for i, _ in ShardSampler(len(dataset), rank, 2, seed=1)][:8]
        expected = torch.from_numpy(dataset.images[indices].astype(np.float32)).unsqueeze(1).expand(8, 3, 28, 28)
        assert im_q.device.type == device
        torch.testing.assert_close(pixels(im_q), expected, atol=0.5, rtol=0)
        assert labels.tolist() == dataset.targets[indices].tolist()


# --- the ops, one by one, against torchvision's on PIL images (what the reference loader runs) ---


@pytest.fixture(scope="module")
def photos():
    return [
        Image.fromarray(getattr(skimage.data, name)()[..., :3]).resize((64, 48))
        for name in ("astronaut", "coffee", "chelsea")
    ]


def run_graph(graph, photos) -> list[np.ndarray]:
    @pipeline_def(batch_size=len(photos), num_threads=1, device_id=None, seed=0)
    def pipe():
        return graph(fn.external_source(source=lambda: [np.asarray(p) for p in photos], batch=True, layout="HWC"))

    p = pipe()
    p.build()
    return [np.asarray(t) for t in p.run()[0]]


def differences(graph, reference, photos) -> np.ndarray:
    return np.stack(
        [
            np.abs(out.astype(int) - np.asarray(reference(p)).astype(int))
            for out, p in zip(run_graph(graph, photos), photos)
        ]
    )


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_brightness_contrast_saturation_are_pils(photos, factor):
    for ours, theirs in (
        (dali_loader.adjust_brightness, F.adjust_brightness),
        (dali_loader.adjust_contrast, F.adjust_contrast),
        (dali_loader.adjust_saturation, F.adjust_saturation),
    ):
        assert differences(lambda x: ours(x, factor), lambda p: theirs(p, factor), photos).max() <= 1, ours.__name__


@pytest.mark.parametrize("turns", [-0.4, -0.1, 0.05, 0.1])
def test_hue_is_torchvisions_hexcone_shift(photos, turns):
    """Within one level of torchvision's float HSV shift; as close to its PIL version as that is (PIL's HSV has
    8-bit channels, which leaves up to 8 levels)."""

    def hue(x):
        return dali_loader.adjust_hue(x, turns)

    def tensor_op(p):
        return F.adjust_hue(F.pil_to_tensor(p), turns).permute(1, 2, 0).numpy()

    assert differences(hue, tensor_op, photos).max() <= 1
    against_pil = differences(hue, lambda p: F.adjust_hue(p, turns), photos)
    assert against_pil.mean() < 1 and against_pil.max() <= 8


def test_grayscale_is_pils(photos):
    assert differences(dali_loader.grayscale, lambda p: F.rgb_to_grayscale(p, 3), photos).max() <= 1


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 2.0])
def test_blur_matches_pil_away_from_the_border(photos, sigma):
    """Kernels of the same variance (shapes differ a little: PIL stacks boxes); the edges differ (DALI reflects,
    PIL repeats the edge pixel), so 3 sigma of border is left out."""
    diff = differences(
        lambda x: dali_loader.gaussian_blur(x, (sigma, sigma)),
        lambda p: p.filter(ImageFilter.GaussianBlur(radius=sigma)),
        photos,
    )
    border = int(np.ceil(3 * sigma))
    interior = diff[:, border:-border, border:-border]
    assert interior.max() <= 6 and interior.mean() < 1


# --- augmentation statistics against the reference loader, ~1,000 views each, measured the same way ---


def views_of(loader, epochs: int) -> torch.Tensor:
    batches = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches += [view for im_q, im_k, _ in loader for view in (im_q, im_k)]
    return pixels(torch.cat(batches)).round()  # 8-bit levels: float noise would split the grey views' ties


def both_loaders(root, recipe, device, epochs=4, image_size=32):
    options = dict(batch_size=32, image_size=image_size, aug=recipe, seed=0)
    ours = build_loader("dali", str(root), device=device, num_workers=2, **options)
    reference = build_loader("torch", str(root), device="cpu", num_workers=0, **options)
    return views_of(ours, epochs), views_of(reference, epochs)


def ramp_slope(profiles: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of each row of (N, S) profiles, leaving out two pixels at each end (resampling edges)."""
    y = profiles[:, 2:-2]
    x = torch.arange(y.shape[1], dtype=torch.float32)
    x = x - x.mean()
    return (y - y.mean(1, keepdim=True)) @ x / (x @ x)


def crop_geometry(views: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area and log aspect ratio of each view's crop box, relative to the coordinate image, and whether it is
    flipped: the R and G ramps give the box's width and height in source pixels."""
    size = views.shape[-1]
    width, height = COORD_SIZE
    slope_x = ramp_slope(views[:, 0].mean(1))  # R along the columns
    slope_y = ramp_slope(views[:, 1].mean(2))  # G down the rows
    crop_w = slope_x.abs() * size / 255 * (width - 1)
    crop_h = slope_y.abs() * size / 255 * (height - 1)
    area = crop_w * crop_h / (width * height)
    return area.numpy(), torch.log(crop_w / crop_h).numpy(), (slope_x < 0).numpy()


def assert_rate(hits: np.ndarray, p: float):
    assert stats.binomtest(int(hits.sum()), len(hits), p).pvalue > 1e-3, f"rate {hits.mean():.3f}, expected {p}"


@pytest.mark.parametrize("device", DEVICES)
def test_crop_and_flip_statistics_match_the_reference(coordinate_folder, device):
    ours, reference = both_loaders(coordinate_folder, CROP_AND_FLIP, device)
    assert len(ours) == len(reference) == 1024
    (area, aspect, flipped), (ref_area, ref_aspect, ref_flipped) = crop_geometry(ours), crop_geometry(reference)
    assert stats.ks_2samp(area, ref_area).pvalue > 0.01
    assert stats.ks_2samp(aspect, ref_aspect).pvalue > 0.01
    assert 0.15 < area.min() and area.max() < 1.05
    assert_rate(flipped, CROP_AND_FLIP.flip_prob)
    assert_rate(ref_flipped, CROP_AND_FLIP.flip_prob)


@pytest.mark.parametrize("device", DEVICES)
def test_full_recipe_statistics_match_the_reference(coordinate_folder, device):
    """aug+ end to end: grayscale and jitter rates, and the distributions of brightness and colour. The coordinate
    images' B is 128 everywhere and only jitter moves it, so a non-grey view whose B moved was jittered."""
    ours, reference = both_loaders(coordinate_folder, V2, device)

    def chroma(v):
        return (v.amax(1) - v.amin(1)).mean(dim=(1, 2)).numpy()

    def blue_of_colour_views(v):
        return v[:, 2].mean(dim=(1, 2)).numpy()[chroma(v) >= 2]

    def brightness(v):
        return v.mean(dim=(1, 2, 3)).numpy()

    assert_rate(chroma(ours) < 2, V2.grayscale_prob)
    assert_rate(chroma(reference) < 2, V2.grayscale_prob)
    jittered = np.abs(blue_of_colour_views(ours) - 128) > 1.5
    ref_jittered = np.abs(blue_of_colour_views(reference) - 128) > 1.5
    counts = [[jittered.sum(), (~jittered).sum()], [ref_jittered.sum(), (~ref_jittered).sum()]]
    assert stats.fisher_exact(counts).pvalue > 0.01 and 0.7 < jittered.mean() < V2.jitter_prob
    for measure in (blue_of_colour_views, brightness, chroma):
        assert stats.ks_2samp(measure(ours), measure(reference)).pvalue > 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_blur_statistics_match_the_reference(square_photo_folder, device):
    """Blur alone on an uncropped photo: sharpness away from the border spreads with blur_prob and the sigma range;
    a view left alone is the photo itself."""
    blur_only = dataclasses.replace(IDENTITY, blur_prob=0.5)
    ours, reference = both_loaders(square_photo_folder, blur_only, device, image_size=48)

    def sharpness(v):
        v = v[..., 6:-6, 6:-6]
        return (v[..., 1:] - v[..., :-1]).abs().mean(dim=(1, 2, 3)).numpy()

    assert stats.ks_2samp(sharpness(ours), sharpness(reference)).pvalue > 0.01
    assert_rate(sharpness(ours) < sharpness(reference).max() - 1e-3, blur_only.blur_prob)


# --- GPU features ---


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("decode", ["once", "roi"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_decoder_contract(photo_folder, decode, dtype):
    loader = dali(photo_folder, batch_size=8, image_size=32, device="cuda", dtype=dtype, decode=decode)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    for im_q, im_k, labels in batches:
        assert im_q.device.type == im_k.device.type == labels.device.type == "cuda"
        assert im_q.dtype == dtype and im_q.is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(im_q, im_k)


@pytest.mark.gpu
@requires_cuda
def test_every_output_leaves_dali_on_the_gpu(photo_folder):
    """Labels too: no per-step copy by torch, and no pinned CPU output (kDLCUDAHost, which torch cannot import)."""
    loader = dali(photo_folder, device="cuda")
    shard = dali_loader.epoch_batches_shard(len(loader.dataset), 8, 0, 1, 0, 0)
    outputs = loader.pipeline(shard, 0, None).run()
    assert len(outputs) == 3 and all(isinstance(output, TensorListGPU) for output in outputs)


@pytest.mark.gpu
@requires_cuda
def test_a_batch_is_held_until_the_step_that_reads_it_has_run(photo_folder):
    """The step is queued after the batch is handed out: a batch is let go only once that step has run, also when
    the consumer stops after it."""
    loader = dali(photo_folder, device="cuda")
    batches = iter(loader)
    first, _, _ = next(batches)
    torch.cuda._sleep(1 << 30)  # a step on the batch, still running when the next batch is asked for
    second, _, _ = next(batches)
    ((held, event),) = loader.in_flight.held
    assert held[0].data_ptr() == first.data_ptr() and not event.query()
    torch.cuda._sleep(1 << 30)
    batches.close()
    held, event = loader.in_flight.held[-1]
    assert held[0].data_ptr() == second.data_ptr() and not event.query()
    torch.cuda.synchronize()

"""The loader contract, checked on the reference torch loader and the synthetic one."""

import numpy as np
import pytest
import torch
from conftest import IDENTITY
from PIL import Image

from pipeline import build_loader
from pipeline.augs import IMAGENET_MEAN, IMAGENET_STD, get_recipe
from pipeline.datasets import resolve_dataset
from pipeline.torch_loader import ShardSampler

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """Four classes, each image a solid colour of its class: labels can be read off the pixels."""
    root = tmp_path_factory.mktemp("colours")
    for label, colour in enumerate(COLOURS):
        (root / f"class{label}").mkdir()
        for i in range(10):
            Image.new("RGB", (24 + i, 20), colour).save(root / f"class{label}" / f"{i}.png")
    return root


def normalised(rgb):
    return [(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_on_an_image_folder(colour_folder, dtype):
    loader = build_loader(
        "torch", str(colour_folder), batch_size=8, image_size=16, device="cpu", aug=IDENTITY, dtype=dtype, num_workers=0
    )
    assert len(loader) == 40 // 8
    batches = list(loader)
    assert len(batches) == 5
    for im_q, im_k, labels in batches:
        assert im_q.shape == im_k.shape == (8, 3, 16, 16) and im_q.dtype == dtype and labels.dtype == torch.int64
        assert im_q.is_contiguous(memory_format=torch.channels_last) and im_q.device.type == "cpu"
        for img, label in zip(im_q.float(), labels):  # every pixel is the normalised class colour
            expected = torch.tensor(normalised(COLOURS[label])).view(3, 1, 1).expand(3, 16, 16)
            torch.testing.assert_close(img, expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == sorted([c for c in range(4) for _ in range(10)])


def test_fashion_mnist_values_match_the_idx_pixels():
    loader = build_loader(
        "torch", "fashion-mnist", batch_size=4, image_size=28, device="cpu", aug=IDENTITY, num_workers=0
    )
    dataset = resolve_dataset("fashion-mnist", "train", 28)
    im_q, _, labels = next(iter(loader))
    pixels = torch.from_numpy(dataset.images.astype(np.float32) / 255)
    for img, label in zip(im_q, labels):
        grey = img[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        match = (pixels - grey).abs().amax(dim=(1, 2)).argmin()
        assert (pixels[match] - grey).abs().max() < 1e-5 and dataset.targets[match] == label
        assert img.min() >= (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_views_normalised_on_the_device_equal_totensor_normalize(dtype):
    """The workers hand over uint8 and the device normalises: the views equal what torchvision's ToTensor +
    Normalize give for the same images and seeds (the full aug+ recipe), within float rounding."""
    from torchvision import transforms as T

    from pipeline.torch_loader import view_transform

    loader = build_loader(
        "torch", "fashion-mnist", batch_size=8, image_size=32, device="cpu", dtype=dtype, num_workers=2
    )
    recipe = get_recipe("v2")
    uint8_ops = view_transform(recipe, 32).transforms
    reference = T.Compose(uint8_ops[:-1] + [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)])
    dataset = resolve_dataset("fashion-mnist", "train", 32)
    keys = list(loader.sampler)[:8]  # epoch 0's first batch (iterating ends the epoch)
    im_q, im_k, _ = next(iter(loader))
    expected = []
    for index, seed in keys:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img, _ = dataset[index]
            expected.append((reference(img), reference(img)))
    for view, ref in ((im_q, torch.stack([e[0] for e in expected])), (im_k, torch.stack([e[1] for e in expected]))):
        assert view.dtype == dtype and view.is_contiguous(memory_format=torch.channels_last)
        tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
        torch.testing.assert_close(view.float(), ref.to(dtype).float(), **tolerance)


def test_two_views_differ_and_seed_reproduces(colour_folder):
    def make(seed, workers):
        return build_loader(
            "torch", "fashion-mnist", batch_size=16, image_size=28, device="cpu", seed=seed, num_workers=workers
        )

    q, k, y = next(iter(make(0, 0)))
    assert all(not torch.allclose(a, b) for a, b in zip(q, k))
    q2, k2, y2 = next(iter(make(0, 2)))  # per-sample seeds: the worker count does not matter
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(y, y2)
    q3, _, _ = next(iter(make(1, 0)))
    assert not torch.equal(q, q3)


def test_epochs_reshuffle_and_set_epoch_replays(colour_folder):
    loader = build_loader("torch", "fashion-mnist", batch_size=16, image_size=28, device="cpu", num_workers=0)
    first = next(iter(loader))[0]
    second = next(iter(loader))[0]  # iterating again moves to the next epoch
    loader.set_epoch(0)
    replay = next(iter(loader))[0]
    assert not torch.equal(first, second) and torch.equal(first, replay)


def test_shards_are_disjoint_and_cover_the_epoch():
    n, world = 103, 3
    shards = [[i for i, _ in ShardSampler(n, r, world, seed=5)] for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == (n // world) * world


def test_epoch_length_drops_the_last_partial_batch(colour_folder):
    for world in (1, 2):
        loader = build_loader(
            "torch",
            str(colour_folder),
            batch_size=6,
            image_size=8,
            device="cpu",
            rank=world - 1,
            world_size=world,
            num_workers=0,
        )
        assert len(loader) == (40 // world) // 6 == len(list(loader))


def test_synthetic_contract():
    loader = build_loader("synthetic", "", batch_size=4, image_size=8, device="cpu", dtype=torch.bfloat16, steps=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    q, k, y = batches[0]
    assert q.shape == (4, 3, 8, 8) and q.dtype == torch.bfloat16 and q.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(q, k) and y.shape == (4,)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown loader 'nope'"):
        build_loader("nope", "", batch_size=1, image_size=8, device="cpu")

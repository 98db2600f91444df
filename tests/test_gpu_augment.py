"""pipeline.gpu_augment against torchvision: each op on given parameters, and the whole module's output statistics
against torchvision's random transforms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from conftest import requires_cuda
from PIL import Image
from scipy import stats

from benchmarks.core.diagnostics import HostReads
from benchmarks.core.host import torch_threads
from pipeline.augs import get_recipe
from pipeline.gpu_augment import (
    BLUR_TRUNCATE,
    BRIGHTNESS,
    CONTRAST,
    SATURATION,
    TwoViewAugment,
    adjust_hue,
    blend,
    color_jitter,
    flip_horizontally,
    gaussian_blur,
    to_grayscale,
)

TOLERANCE = 1e-5
BLEND_REFERENCES = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Random colours plus the hard cases: a gray image, pure primaries, black and white."""
    x = torch.rand(8, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    x[0] = 0.5
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[1, :, 4:8] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    x[1, :, 8:12] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    x[2, :, :4], x[2, :, 4:8] = 0.0, 1.0
    return x


def per_sample(fn, x: torch.Tensor, *params) -> torch.Tensor:
    return torch.stack([fn(x[i], *(float(p[i]) for p in params)) for i in range(len(x))])


@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION])
def test_blend_ops_match_torchvision(images, op):
    factors = torch.tensor([0.0, 0.6, 1.0, 1.4, 0.9, 1.2, 2.0, 0.3])
    out = blend(images, torch.full((len(images),), op), factors)
    torch.testing.assert_close(out, per_sample(BLEND_REFERENCES[op], images, factors), atol=TOLERANCE, rtol=0)


def test_adjust_hue_matches_torchvision(images):
    shifts = torch.tensor([-0.5, -0.3, -0.1, 0.0, 0.05, 0.2, 0.4, 0.5])
    torch.testing.assert_close(
        adjust_hue(images, shifts), per_sample(TF.adjust_hue, images, shifts), atol=TOLERANCE, rtol=0
    )


def test_color_jitter_applies_each_samples_own_order():
    """All 24 orders of the four ops, each checked against torchvision's ops called in that order."""
    orders = list(itertools.permutations(range(4)))
    x = torch.rand(len(orders), 3, 12, 12, generator=torch.Generator().manual_seed(1))
    factors = torch.tensor([1.3, 0.7, 1.4]).repeat(len(orders), 1)  # clamping matters, so order does too
    hue = torch.full((len(orders),), 0.08)
    hue_op = 3
    blend_order = torch.tensor([[op for op in order if op != hue_op] for order in orders])
    hue_position = torch.tensor([order.index(hue_op) for order in orders])
    out = color_jitter(x, factors, blend_order, hue, hue_position)
    references = {**BLEND_REFERENCES, hue_op: TF.adjust_hue}
    for i, order in enumerate(orders):
        expected = x[i]
        for op in order:
            expected = references[op](expected, float(hue[i]) if op == hue_op else float(factors[i, op]))
        torch.testing.assert_close(out[i], expected, atol=TOLERANCE, rtol=0, msg=f"order {order}")


def test_grayscale_matches_torchvision_and_skips_unselected(images):
    selected = torch.tensor([True, False] * 4)
    out = to_grayscale(images, selected)
    expected = torch.stack([TF.rgb_to_grayscale(img, 3) if s else img for img, s in zip(images, selected)])
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=0)
    assert torch.equal(out[~selected], images[~selected])


def test_flip_matches_torchvision_and_skips_unselected(images):
    selected = torch.tensor([True, False] * 4)
    for batch in (images, (images * 255).to(torch.uint8)):
        expected = torch.stack([TF.hflip(img) if s else img for img, s in zip(batch, selected)])
        assert torch.equal(flip_horizontally(batch, selected), expected)


def test_gaussian_blur_matches_torchvision(images):
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.0, 1.7, 0.3, 0.0])
    radius = 6
    out = gaussian_blur(images, sigma, radius)
    expected = torch.stack(
        [TF.gaussian_blur(img, [2 * radius + 1] * 2, [float(s)] * 2) if s > 0 else img for img, s in zip(images, sigma)]
    )
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=0)
    assert torch.equal(out[sigma == 0], images[sigma == 0])


def test_sampled_parameters_follow_the_recipe():
    recipe = get_recipe("v2")
    n = 20_000
    params = TwoViewAugment(recipe, device="cpu", seed=0).sample(n)
    jittered = (params.factors != 1).any(dim=1)
    tolerance = 4.5 * np.sqrt(0.25 / n)  # 4.5 standard errors of a rate
    assert abs(jittered.float().mean().item() - recipe.jitter_prob) < tolerance
    for column, strength in enumerate((recipe.brightness, recipe.contrast, recipe.saturation)):
        drawn = params.factors[jittered, column]
        assert drawn.min() >= 1 - strength and drawn.max() <= 1 + strength
        assert stats.kstest(drawn.numpy(), stats.uniform(1 - strength, 2 * strength).cdf).pvalue > 1e-3
    assert params.hue.abs().max() <= recipe.hue and torch.all(params.hue[~jittered] == 0)
    orders = [tuple(o) for o in torch.cat([params.blend_order, params.hue_position[:, None]], dim=1).tolist()]
    counts = np.unique(np.array(orders), axis=0, return_counts=True)[1]
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > 1e-3
    assert abs(params.grayscale.float().mean().item() - recipe.grayscale_prob) < tolerance
    blurred = params.sigma > 0
    assert abs(blurred.float().mean().item() - recipe.blur_prob) < tolerance
    assert params.sigma[blurred].min() >= recipe.blur_sigma[0] and params.sigma.max() <= recipe.blur_sigma[1]
    assert abs(params.flip.float().mean().item() - recipe.flip_prob) < tolerance


def test_forward_contract():
    size, batch = 24, 6
    gen = torch.Generator().manual_seed(3)
    im_q, im_k = (
        torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(2)
    )
    outputs = {}
    for name, inputs in {"uint8": (im_q, im_k), "float": (im_q / 255.0, im_k / 255.0)}.items():
        augment = TwoViewAugment("v2", device="cpu", dtype=torch.bfloat16, seed=7)
        outputs[name] = augment(*inputs)
    for out in outputs["uint8"]:
        assert out.shape == (batch, 3, size, size) and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(outputs["uint8"], outputs["float"]):
        torch.testing.assert_close(a, b)
    again = augment(im_q / 255.0, im_k / 255.0)
    assert not torch.equal(again[0], outputs["float"][0]), "each call draws new parameters"


def summary_statistics(views: torch.Tensor) -> dict[str, np.ndarray]:
    """Per view (N, 3, H, W in [0, 1]): brightness, contrast, colourfulness and sharpness, rounded so float
    noise (a gray view's chroma of 1e-8 rather than 0) does not count as a difference."""
    luma = 0.299 * views[:, 0] + 0.587 * views[:, 1] + 0.114 * views[:, 2]
    statistics = {
        "mean luma": luma.mean(dim=(1, 2)),
        "luma std": luma.std(dim=(1, 2)),
        "mean chroma": (views.amax(dim=1) - views.amin(dim=1)).mean(dim=(1, 2)),
        "mean |dx|": (luma[:, :, 1:] - luma[:, :, :-1]).abs().mean(dim=(1, 2)),
    }
    return {name: values.numpy().round(4) for name, values in statistics.items()}


def torchvision_random_ops(recipe) -> T.Compose:
    """The reference loader's jitter, grayscale and blur as torchvision's own random transforms, on tensors.

    The reference applies them to PIL images, which round down to uint8 after every op (about -0.5/255 of
    brightness per op); on float tensors they are the exact semantics this module implements.
    """
    radius = math.ceil(BLUR_TRUNCATE * recipe.blur_sigma[1])
    return T.Compose(
        [
            T.RandomApply(
                [T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)], p=recipe.jitter_prob
            ),
            T.RandomGrayscale(recipe.grayscale_prob),
            T.RandomApply([T.GaussianBlur(2 * radius + 1, recipe.blur_sigma)], p=recipe.blur_prob),
        ]
    )


@pytest.mark.parametrize("aug", ["v1", "v2"])
def test_output_statistics_match_torchvision_random_transforms(aug):
    """1,000 views of one photo through this module and through torchvision's random transforms have the same
    distributions of brightness, contrast, colour and sharpness: probabilities, ranges, op order and op
    sequence all agree."""
    import skimage.data

    size, views = 48, 1000
    photo = torch.from_numpy(np.array(Image.fromarray(skimage.data.astronaut()).resize((size, size)))).permute(2, 0, 1)
    recipe = get_recipe(aug)
    torch.manual_seed(0)
    reference_ops = torchvision_random_ops(recipe)
    with torch_threads(1):  # thousands of ops on tiny tensors: starting threads would cost more
        reference = torch.stack([reference_ops(photo / 255.0) for _ in range(views)])
    batch = photo.expand(views // 2, 3, size, size)
    mean, std = torch.tensor(recipe.mean).view(3, 1, 1), torch.tensor(recipe.std).view(3, 1, 1)
    ours = torch.cat(TwoViewAugment(recipe, device="cpu", seed=0)(batch, batch)) * std + mean
    reference_statistics = summary_statistics(reference)
    for name, values in summary_statistics(ours).items():
        assert stats.ks_2samp(values, reference_statistics[name]).pvalue > 1e-3, name


def test_reads_nothing_back_on_the_host():
    """The CPU counterpart of the check below: no op that would make the host wait for a GPU."""
    augment = TwoViewAugment("v2", device="cpu")
    views = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    with HostReads() as reads:
        augment(views, views)
    assert reads.found == []


@pytest.mark.gpu
@requires_cuda
def test_no_host_sync_on_cuda():
    """Every draw and op stays on the GPU: torch raises on any synchronising call while the mode is "error"."""
    augment = TwoViewAugment("v2", device="cuda")
    views = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    views = views.contiguous(memory_format=torch.channels_last)
    augment(views, views)  # first call: lazy CUDA initialisation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment(views, views)
    finally:
        torch.cuda.set_sync_debug_mode("default")

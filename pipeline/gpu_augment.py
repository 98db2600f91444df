"""Flip, colour jitter, grayscale, Gaussian blur and normalisation of whole batches, each sample drawn at random.

The FFCV loader decodes and crops on the CPU; everything else of the aug/aug+ recipe runs here, where the batch
already is (the GPU in training, the CPU in tests), on both views at once. Every per-sample choice is a
tensor drawn from a `torch.Generator`, and every op runs on the whole batch with identity parameters for the
samples it skips, so there is no host sync and no data-dependent Python branch: the module can be captured
in a CUDA graph (register its `generator` with the graph, as for any generator but the default one).

Semantics are torchvision's functional tensor ops on float images in [0, 1]:
  - flip: `hflip`, first rather than last as in the recipe: every later op is per pixel or a symmetric blur,
    so the order changes nothing;
  - colour jitter: brightness, contrast and saturation factors uniform in [max(0, 1 - s), 1 + s], hue shift
    uniform in [-h, h] turns, the four ops in a random order per sample as `ColorJitter` does, each clamped
    to [0, 1] as `adjust_*` does;
  - grayscale: `rgb_to_grayscale` with 3 output channels;
  - blur: a Gaussian of sigma uniform in the recipe's range, truncated at 3 sigma of the largest sigma
    (13 taps for sigma <= 2), reflect padding, as `gaussian_blur`. The reference loader uses PIL's
    `GaussianBlur(radius=sigma)`, the same Gaussian up to PIL's box approximation and its edge handling.
The reference works on PIL uint8 images and rounds after each op; here images stay float throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.augs import AugRecipe, get_recipe

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
LUMA = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
BLUR_TRUNCATE = 3.0  # kernel radius in sigmas of the recipe's largest sigma


@dataclass(frozen=True)
class AugParams:
    """One batch's per-sample draws (N = batch size); identity values where an op is not applied."""

    factors: torch.Tensor  # (N, 3) brightness, contrast, saturation factors; 1 leaves the image alone
    blend_order: torch.Tensor  # (N, 3) permutation of BRIGHTNESS, CONTRAST, SATURATION
    hue: torch.Tensor  # (N,) hue shift in turns; 0 leaves the image alone
    hue_position: torch.Tensor  # (N,) how many of the three blend ops come before the hue shift, 0..3
    grayscale: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,) blur sigma; 0 leaves the image alone
    flip: torch.Tensor  # (N,) bool


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grayscale of an (N, 3, H, W) float batch."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def blend(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per sample, brightness, contrast or saturation (`op`) by `factor`, clamped to [0, 1].

    All three are torchvision's `_blend(img, reference, factor)`, with reference black, the mean luma, or the
    pixel's luma; factor 1 returns `x` exactly, so one pass serves every sample whatever its op.
    """
    gray = luma(x)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    is_contrast = (op == CONTRAST).to(x.dtype).view(-1, 1, 1, 1)
    is_saturation = (op == SATURATION).to(x.dtype).view(-1, 1, 1, 1)
    reference = gray.mul_(is_saturation).add_(mean * is_contrast)
    return x.lerp(reference, (1.0 - factor).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue by `hue` turns: torchvision's RGB -> HSV -> RGB round trip in closed form.

    Value (max) and chroma (max - min) are unchanged by a hue shift, so only the hue sextant is computed,
    shifted, and turned back into RGB with the standard formula f(n) = V - C * clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 * hue) mod 6.
    """
    r, g, b = x.unbind(1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    red_max, green_max = value == r, value == g
    # Hue in sixths of a turn, times chroma: (g - b), 2 + (b - r) or 4 + (r - g) by which channel is largest.
    sextant = torch.where(
        red_max, g - b, torch.where(green_max, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0))
    )
    # Where chroma is 0 the numerator is 0 too, so any positive divisor gives hue 0, as torchvision's does.
    sextant.div_(chroma.clamp(min=1e-12)).add_(6.0 * hue.view(-1, 1, 1)).remainder_(6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = sextant.add(n).remainder_(6.0)
        ramp = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)  # clamp(min(k, 4 - k), 0, 1) for k in [0, 6)
        channels.append(torch.addcmul(value, chroma, ramp, value=-1.0))
    return torch.stack(channels, dim=1)


def color_jitter(
    x: torch.Tensor, factors: torch.Tensor, blend_order: torch.Tensor, hue: torch.Tensor, hue_position: torch.Tensor
) -> torch.Tensor:
    """torchvision's ColorJitter with a random op order per sample.

    A uniform order of the four ops is a uniform order of the three blend ops plus a uniform position of the
    hue shift among them. So three blend passes run before the hue shift and three after; each sample's j-th
    blend op gets its factor in the pass before the hue if j < hue_position, after it otherwise, and factor 1
    (identity) in the other.
    """
    ordered_factors = factors.gather(1, blend_order)
    for j in range(3):
        before = j < hue_position
        x = blend(x, blend_order[:, j], torch.where(before, ordered_factors[:, j], 1.0))
    x = adjust_hue(x, hue)
    for j in range(3):
        after = j >= hue_position
        x = blend(x, blend_order[:, j], torch.where(after, ordered_factors[:, j], 1.0))
    return x


def flip_horizontally(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """`hflip` for the selected samples of an NCHW batch of any dtype."""
    return torch.where(selected.view(-1, 1, 1, 1), x.flip(3), x)


def to_grayscale(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """`rgb_to_grayscale(x, 3)` for the selected samples: saturation by factor 0, identity elsewhere."""
    saturation = torch.full_like(selected, SATURATION, dtype=torch.long)
    return blend(x, saturation, (~selected).to(x.dtype))


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, 2 * radius + 1) normalised 1-D Gaussians; sigma 0 gives the identity (a unit impulse)."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).unsqueeze(1)
    kernels = torch.exp(-0.5 * (offsets / safe_sigma) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    impulse = (offsets == 0).to(sigma.dtype).expand_as(kernels)
    return torch.where(sigma.unsqueeze(1) > 0, kernels, impulse)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-sample separable Gaussian blur with reflect padding: two depthwise convolutions, one per axis."""
    n, c, h, w = x.shape
    kernels = gaussian_kernels(sigma, radius).repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect").reshape(
        1, n * c, h + 2 * radius, w + 2 * radius
    )
    rows = F.conv2d(padded, kernels.view(n * c, 1, 1, -1), groups=n * c)
    return F.conv2d(rows, kernels.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)


class TwoViewAugment(torch.nn.Module):
    """Flip, jitter, grayscale, blur and normalisation of the two (already cropped) views, in one pass.

    Takes uint8 (0..255) or float (0..1) NCHW batches and returns normalised `dtype` channels_last batches.
    """

    def __init__(self, aug: "str | AugRecipe", *, device, dtype=torch.float32, seed: int = 0):
        super().__init__()
        self.recipe = get_recipe(aug)
        self.dtype = dtype
        device = torch.device(device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.blur_radius = math.ceil(BLUR_TRUNCATE * self.recipe.blur_sigma[1])
        self.register_buffer("mean", torch.tensor(self.recipe.mean, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.recipe.std, device=device).view(1, 3, 1, 1))

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.empty(n, device=self.mean.device).uniform_(low, high, generator=self.generator)

    def _chance(self, n: int, p: float) -> torch.Tensor:
        return self._uniform(n, 0.0, 1.0) < p

    def sample(self, n: int) -> AugParams:
        """Draw the parameters of `n` samples, as the reference's RandomApply/ColorJitter/RandomGrayscale do."""
        r = self.recipe
        jittered = self._chance(n, r.jitter_prob)
        factors = torch.stack(
            [self._uniform(n, max(0.0, 1 - s), 1 + s) for s in (r.brightness, r.contrast, r.saturation)], dim=1
        )
        factors = torch.where(jittered.unsqueeze(1), factors, 1.0)
        blend_order = torch.rand(n, 3, device=self.mean.device, generator=self.generator).argsort(dim=1)
        hue = torch.where(jittered, self._uniform(n, -r.hue, r.hue), 0.0)
        hue_position = (self._uniform(n, 0.0, 4.0).floor_().long()).clamp_(max=3)
        blurred = self._chance(n, r.blur_prob)
        sigma = torch.where(blurred, self._uniform(n, *r.blur_sigma), 0.0)
        return AugParams(
            factors,
            blend_order,
            hue,
            hue_position,
            self._chance(n, r.grayscale_prob),
            sigma,
            self._chance(n, r.flip_prob),
        )

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Augment and normalise a float [0, 1] NCHW batch (already flipped) with the given parameters."""
        if self.recipe.jitter_prob > 0:
            x = color_jitter(x, params.factors, params.blend_order, params.hue, params.hue_position)
        if self.recipe.grayscale_prob > 0:
            x = to_grayscale(x, params.grayscale)
        if self.recipe.blur_prob > 0:
            x = gaussian_blur(x, params.sigma, self.blur_radius)
        return x.sub(self.mean).div_(self.std).to(self.dtype, memory_format=torch.channels_last)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([im_q, im_k])
        params = self.sample(len(both))
        # Flipped before the conversion to float, while the batch is four times smaller.
        x = flip_horizontally(both, params.flip).to(torch.float32, memory_format=torch.contiguous_format)
        if im_q.dtype == torch.uint8:
            x = x.div_(255.0)
        out = self.apply(x, params)
        return out[: len(im_q)], out[len(im_q) :]

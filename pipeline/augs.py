"""The aug (MoCo v1) and aug+ (MoCo v2) recipes: the one place every loader reads them from.

Values are those of the official `main_moco.py`:

    v1: RandomResizedCrop(224, scale=(0.2, 1.)), RandomGrayscale(p=0.2),
        ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip()
    v2: RandomResizedCrop(224, scale=(0.2, 1.)),
        RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), RandomGrayscale(p=0.2),
        RandomApply([GaussianBlur([.1, 2.])], p=0.5), RandomHorizontalFlip()

followed by ToTensor and Normalize with the ImageNet mean/std. Every loader applies crop, jitter, grayscale,
blur, flip, normalise in that order. Official v1 puts grayscale before jitter; the two commute up to clamping
(saturation and hue leave a gray image gray, brightness and contrast are linear in luma), so one order serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugRecipe:
    """Parameters of one view's augmentation, in the order the ops are applied."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_prob: float
    grayscale_prob: float
    blur_sigma: tuple[float, float]
    blur_prob: float
    flip_prob: float
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


AUG_RECIPES: dict[str, AugRecipe] = {
    "v1": AugRecipe(
        crop_scale=(0.2, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.4,
        jitter_prob=1.0,
        grayscale_prob=0.2,
        blur_sigma=(0.1, 2.0),
        blur_prob=0.0,
        flip_prob=0.5,
    ),
    "v2": AugRecipe(
        crop_scale=(0.2, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        jitter_prob=0.8,
        grayscale_prob=0.2,
        blur_sigma=(0.1, 2.0),
        blur_prob=0.5,
        flip_prob=0.5,
    ),
}


def get_recipe(aug: "str | AugRecipe") -> AugRecipe:
    """The named recipe; a recipe passes through (tests and ablations use modified copies)."""
    if isinstance(aug, AugRecipe):
        return aug
    if aug not in AUG_RECIPES:
        raise ValueError(f"unknown augmentation {aug!r}; choose one of: {', '.join(AUG_RECIPES)}")
    return AUG_RECIPES[aug]

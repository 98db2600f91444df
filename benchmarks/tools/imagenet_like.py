"""Generate an ImageNet-shaped JPEG ImageFolder from the colour photographs scikit-image ships.

No real ImageNet is reachable offline, so loader benchmarks run on this: real photographic content
(random crops, rescales, flips and colour shifts of scikit-image's bundled photos), ImageNet's size
distribution (mean about 500x375, aspect ratios 3:4 to 16:9), baseline JPEG at quality ~90.

    python -m benchmarks.tools.imagenet_like OUT_DIR --images 2000 --classes 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "hubble_deep_field")


def _photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()[..., :3]) for name in PHOTOS]


def _sample_size(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height around ImageNet's typical 500x375: log-normal area, landscape-leaning aspect."""
    area = float(np.exp(rng.normal(np.log(500 * 375), 0.35)))
    aspect = float(rng.choice([4 / 3, 4 / 3, 4 / 3, 3 / 2, 1.0, 16 / 9, 3 / 4, 2 / 3]))
    width = int(np.clip(np.sqrt(area * aspect), 64, 1600))
    height = int(np.clip(np.sqrt(area / aspect), 64, 1600))
    return width, height


def make_image(photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    photo = photos[rng.integers(len(photos))]
    scale = rng.uniform(0.3, 1.0)
    cw, ch = max(16, int(photo.width * scale)), max(16, int(photo.height * scale))
    x, y = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    img = photo.crop((x, y, x + cw, y + ch)).resize(_sample_size(rng), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    gains = rng.uniform(0.75, 1.25, size=3)
    shifted = np.asarray(img, dtype=np.float32) * gains + rng.uniform(-20, 20)
    return Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8))


def generate(
    out: Path, images: int, classes: int = 10, quality: int = 90, seed: int = 0, show_progress: bool = True
) -> Path:
    """Write `images` JPEGs in `classes` folders under `out`; returns `out`."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    for c in range(classes):
        (out / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("writing JPEGs", total=images)
        for i in range(images):
            path = out / f"class_{i % classes:03d}" / f"img_{i:07d}.jpg"
            make_image(photos, rng).save(path, quality=quality)
            progress.advance(task)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output ImageFolder root")
    parser.add_argument("--images", type=int, default=2000, help="number of JPEGs (default 2000)")
    parser.add_argument("--classes", type=int, default=10, help="number of class folders (default 10)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out, args.images, args.classes, args.quality, args.seed)
    print(f"wrote {args.images} JPEGs in {args.classes} classes under {args.out}")


if __name__ == "__main__":
    main()

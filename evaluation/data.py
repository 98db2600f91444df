"""The un-augmented labelled data that evaluation reads: the kNN monitor's memory bank and queries, and the
linear probe's features. Resize to 1/0.875 and centre crop (ImageNet) or the plain image (Fashion-MNIST), then
the ImageNet normalisation, as the official main_lincls.py evaluates.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipeline.augs import AugRecipe, get_recipe
from pipeline.common import DeviceNormalize, default_workers, to_uint8_hwc
from pipeline.datasets import is_fashion_mnist, resolve_dataset
from pipeline.torch_loader import LeaveStoppingToTheMainProcess


def eval_transform(recipe: AugRecipe, image_size: int, resize: bool) -> T.Compose:
    """The un-augmented view for kNN and the linear probe: resize to 1/0.875, centre crop; HWC uint8 out, which
    the loader normalises on the device."""
    ops: list = [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size)] if resize else []
    return T.Compose(ops + [to_uint8_hwc])


class EvalDataset(Dataset):
    def __init__(self, base, transform, indices):
        self.base, self.transform, self.indices = base, transform, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.base[self.indices[i]]
        return self.transform(img), label


class EvalLoader:
    """Calling it gives (images, labels) batches of this rank's share of the chosen images, on the device."""

    def __init__(
        self,
        dataset,
        transform,
        normalize,
        indices: list[int],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        device,
        num_workers: int,
        seed: int,
    ):
        self.device, self.normalize = torch.device(device), normalize
        self.shard_sizes = [len(indices[r::world_size]) for r in range(world_size)]
        self.loader = DataLoader(
            EvalDataset(dataset, transform, indices[rank::world_size]),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=LeaveStoppingToTheMainProcess(),
            generator=torch.Generator().manual_seed(seed),
        )

    def __call__(self):
        for images, labels in self.loader:
            yield self.normalize(images), labels.to(self.device, non_blocking=True)


def build_eval_loader(
    data,
    split,
    *,
    image_size,
    batch_size,
    device,
    dtype=torch.float32,
    max_samples=None,
    num_workers=None,
    seed=0,
    verify=True,
    rank=0,
    world_size=1,
) -> EvalLoader:
    """The un-augmented `split`, or a fixed random subset of it, shared out over `world_size` ranks.

    The chosen images are checked here, when the loader is built, so bad data fails before any training; of a
    subset, only the subset (a 20,000-image kNN bank does not open all 1.28M ImageNet files).
    """
    dataset = resolve_dataset(data, split, image_size, verify=False)
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    indices = sorted(indices[:max_samples] if max_samples else indices)
    if verify and hasattr(dataset, "verify"):
        dataset.verify(indices)  # all of them on every rank: a bad image stops every rank, not the one reading it
    recipe = get_recipe("v2")
    transform = eval_transform(recipe, image_size, resize=not is_fashion_mnist(data))
    return EvalLoader(
        dataset,
        transform,
        DeviceNormalize(recipe.mean, recipe.std, device, dtype),
        indices,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        device=device,
        num_workers=default_workers() if num_workers is None else num_workers,
        seed=seed,
    )

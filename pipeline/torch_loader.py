"""The reference loader: the official MoCo recipe (PIL + torchvision transforms, DataLoader workers,
pinned memory, non_blocking copies). Every faster loader is checked against this one.

Unlike the official code, each sample's augmentation is seeded from (seed, epoch, image index), so a run
is reproducible whatever the worker count, and a resumed run sees exactly the views it would have seen.
"""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from PIL import ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from pipeline.augs import AugRecipe, get_recipe
from pipeline.common import default_workers, epoch_seed, epoch_shard, steps_per_epoch, to_step_layout
from pipeline.datasets import is_fashion_mnist, resolve_dataset


class GaussianBlur:
    """The official MoCo blur (PIL, radius = sigma), drawing sigma from torch's RNG so seeding covers it."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def view_transform(recipe: AugRecipe, image_size: int) -> T.Compose:
    """One augmented view, PIL image in, normalised float CHW tensor out."""
    ops: list = [T.RandomResizedCrop(image_size, scale=recipe.crop_scale, ratio=recipe.crop_ratio)]
    if recipe.jitter_prob > 0:
        jitter = T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
        ops.append(T.RandomApply([jitter], p=recipe.jitter_prob))
    ops.append(T.RandomGrayscale(p=recipe.grayscale_prob))
    if recipe.blur_prob > 0:
        ops.append(T.RandomApply([GaussianBlur(recipe.blur_sigma)], p=recipe.blur_prob))
    ops += [T.RandomHorizontalFlip(recipe.flip_prob), T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(ops)


def eval_transform(recipe: AugRecipe, image_size: int, resize: bool) -> T.Compose:
    """The un-augmented view for kNN and the linear probe: resize to 1/0.875, centre crop, normalise."""
    ops: list = [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size)] if resize else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)])


def sample_seed(seed_of_epoch: int, index: int) -> int:
    return (seed_of_epoch * 6364136223846793005 + index * 1442695040888963407) % (2**63)


class ShardSampler(Sampler):
    """This rank's disjoint, equal-sized share of a per-epoch permutation, as (index, sample seed) keys."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed_of_epoch = epoch_seed(self.seed, self.epoch)
        shard = epoch_shard(self.num_samples, self.rank, self.world_size, self.seed, self.epoch).tolist()
        return ((i, sample_seed(seed_of_epoch, i)) for i in shard)


class TwoViewDataset(Dataset):
    """Two independently augmented views of one image, from the sample's own seed."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img, label = self.base[index]
            return self.transform(img), self.transform(img), label


def leave_stopping_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: a signal sent to the whole process group (a terminal, a
    scheduler) reaches the trainer, which stops between steps and shuts them down; killed mid-batch they
    would only turn its stop into a DataLoader error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader:
    """Iterates (im_q, im_k, labels) on the device; `set_epoch` picks the shuffle, else epochs advance."""

    def __init__(self, dataset, transform, *, batch_size, device, dtype, rank, world_size, seed, num_workers):
        self.device, self.dtype = torch.device(device), dtype
        self.sampler = ShardSampler(len(dataset), rank, world_size, seed)
        self.steps = steps_per_epoch(len(dataset), batch_size, world_size)
        self.loader = DataLoader(
            TwoViewDataset(dataset, transform), batch_size=batch_size, sampler=self.sampler, drop_last=True,
            num_workers=num_workers, pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=leave_stopping_to_the_main_process,
        )

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __iter__(self):
        try:
            for im_q, im_k, labels in self.loader:
                yield (to_step_layout(im_q, self.device, self.dtype), to_step_layout(im_k, self.device, self.dtype),
                       labels.to(self.device, non_blocking=True))
        finally:  # also when the consumer stops early: the next iteration is the next epoch
            self.sampler.epoch += 1


def build(data, *, batch_size, image_size, device, aug="v2", rank=0, world_size=1, seed=0,
          dtype=torch.float32, num_workers=None, verify=True):
    dataset = resolve_dataset(data, "train", image_size, verify)
    transform = view_transform(get_recipe(aug), image_size)
    workers = default_workers() if num_workers is None else num_workers
    return TorchLoader(dataset, transform, batch_size=batch_size, device=device, dtype=dtype, rank=rank,
                       world_size=world_size, seed=seed, num_workers=workers)


class EvalDataset(Dataset):
    def __init__(self, base, transform, indices):
        self.base, self.transform, self.indices = base, transform, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.base[self.indices[i]]
        return self.transform(img), label


def build_eval_loader(data, split, *, image_size, batch_size, device, dtype=torch.float32, max_samples=None,
                      num_workers=None, seed=0, verify=True):
    """A callable giving (images, labels) batches of the un-augmented `split`, or a fixed random subset of it.

    The dataset is checked here, when the loader is built, so bad data fails before any training.
    """
    dataset = resolve_dataset(data, split, image_size, verify)
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    indices = sorted(indices[:max_samples] if max_samples else indices)
    transform = eval_transform(get_recipe("v2"), image_size, resize=not is_fashion_mnist(data))
    workers = default_workers() if num_workers is None else num_workers
    device = torch.device(device)
    loader = DataLoader(EvalDataset(dataset, transform, indices), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=leave_stopping_to_the_main_process)

    def batches():
        for images, labels in loader:
            yield to_step_layout(images, device, dtype), labels.to(device, non_blocking=True)

    return batches

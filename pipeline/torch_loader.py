"""The reference loader: the official MoCo recipe (PIL + torchvision transforms, DataLoader workers,
pinned memory, non_blocking copies). Every faster loader is checked against this one.

Workers hand over uint8 NHWC batches and the ImageNet normalisation runs on the device (`DeviceNormalize`):
ToTensor + Normalize within float rounding, at a quarter of the bytes and none of the workers' float work.

Unlike the official code, each sample's augmentation is seeded from (seed, epoch, image index), so a run
is reproducible whatever the worker count, and a resumed run sees exactly the views it would have seen.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Iterator

import torch
from PIL import ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from pipeline.augs import AugRecipe, get_recipe
from pipeline.common import (
    DeviceNormalize,
    check_start_step,
    default_workers,
    derive_seed,
    epoch_shard,
    steps_per_epoch,
    to_uint8_hwc,
)
from pipeline.datasets import resolve_dataset


class GaussianBlur:
    """The official MoCo blur (PIL, radius = sigma), drawing sigma from torch's RNG so seeding covers it."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def view_transform(recipe: AugRecipe, image_size: int) -> T.Compose:
    """One augmented view, PIL image in, HWC uint8 tensor out (normalised later, on the device)."""
    ops: list = [T.RandomResizedCrop(image_size, scale=recipe.crop_scale, ratio=recipe.crop_ratio)]
    if recipe.jitter_prob > 0:
        jitter = T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
        ops.append(T.RandomApply([jitter], p=recipe.jitter_prob))
    ops.append(T.RandomGrayscale(p=recipe.grayscale_prob))
    if recipe.blur_prob > 0:
        ops.append(T.RandomApply([GaussianBlur(recipe.blur_sigma)], p=recipe.blur_prob))
    ops += [T.RandomHorizontalFlip(recipe.flip_prob), to_uint8_hwc]
    return T.Compose(ops)


class ShardSampler(Sampler):
    """This rank's disjoint, equal-sized share of a per-epoch permutation, as (index, sample seed) keys, from
    sample `start` of the share on (a resumed epoch skips the samples it already trained on without loading them)."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shard = epoch_shard(self.num_samples, self.rank, self.world_size, self.seed, self.epoch)[self.start :]
        return ((i, derive_seed(self.seed, self.epoch, index=i)) for i in shard.tolist())


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


class LeaveStoppingToTheMainProcess:
    """A worker_init_fn: workers ignore Ctrl-C, SIGTERM and SIGUSR1 from anyone but the main process.

    A signal sent to the whole process group (a terminal, `timeout`, a scheduler) reaches the trainer, which stops
    between steps and shuts the workers down; killed mid-batch they would only turn its stop into a DataLoader
    error. A SIGTERM from the main process itself is obeyed at once: that is how Python's multiprocessing ends
    daemonic children at interpreter exit (a script that never closed its loader) and how the DataLoader ends a
    worker that does not stop, and ignoring it would hang the exit forever. The three signals are blocked and a
    thread takes them with sigwaitinfo, which says who sent each.
    """

    SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}

    def __init__(self):
        self.main_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)  # inherited by every thread the worker starts
        threading.Thread(target=self._take_signals, name="signals", daemon=True).start()

    def _take_signals(self) -> None:
        while True:
            info = signal.sigwaitinfo(self.SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == self.main_pid:
                os._exit(0)


class TorchLoader:
    """Iterates (im_q, im_k, labels) on the device; `set_epoch` picks the shuffle and the first step, else epochs
    advance. Each sample's views follow from its own seed, so nothing but (epoch, step) is needed to resume."""

    def __init__(self, dataset, transform, normalize, *, batch_size, device, rank, world_size, seed, num_workers):
        self.device, self.normalize, self.batch_size = torch.device(device), normalize, batch_size
        self.sampler = ShardSampler(len(dataset), rank, world_size, seed)
        self.steps = steps_per_epoch(len(dataset), batch_size, world_size)
        self.loader = DataLoader(
            TwoViewDataset(dataset, transform),
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            worker_init_fn=LeaveStoppingToTheMainProcess(),
            # The workers' base seed comes from here, not from the global RNG, whose stream the trainer owns.
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.epoch, self.sampler.start = epoch, check_start_step(start_step, self.steps) * self.batch_size

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        try:
            for im_q, im_k, labels in self.loader:
                yield self.normalize(im_q), self.normalize(im_k), labels.to(self.device, non_blocking=True)
        finally:  # also when the consumer stops early: the next iteration is the next epoch, from its start
            self.sampler.epoch, self.sampler.start = self.sampler.epoch + 1, 0


def build(
    data,
    *,
    batch_size,
    image_size,
    device,
    aug="v2",
    rank=0,
    world_size=1,
    seed=0,
    dtype=torch.float32,
    num_workers=None,
    verify=True,
):
    dataset = resolve_dataset(data, "train", image_size, verify)
    recipe = get_recipe(aug)
    workers = default_workers() if num_workers is None else num_workers
    normalize = DeviceNormalize(recipe.mean, recipe.std, device, dtype)
    return TorchLoader(
        dataset,
        view_transform(recipe, image_size),
        normalize,
        batch_size=batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=workers,
    )

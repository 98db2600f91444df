"""The FFCV backend: a `.beton` (see `pipeline.ffcv_writer`) in, two augmented views on the device out.

FFCV's JIT-compiled CPU threads decode each image and take the two random resized crops (the recipe's scale
and ratio), and copy the uint8 views to the device; there `pipeline.gpu_augment` flips, jitters, grays, blurs
and normalises both views in one batched pass. Two decode strategies:
  once   (default) `TwoViewCropDecoder`: one JPEG decode, two crops from it, both views in one (2, H, W, 3)
         sample: 29-33% less host CPU than `twice` on all-JPEG .betons, 10-17% on half-raw ones
         (benchmarks/results/ffcv_cost_cpu.json).
  twice  FFCV's stock layout: two `PipelineSpec('image', ...)` views, each a RandomResizedCropRGBImageDecoder,
         so each view decodes the image again.
The flip is on the GPU rather than in FFCV because FFCV's RandomHorizontalFlip copies every image, flipped or
not: about 45% of FFCV's CPU time at 256 px (0.72 against 0.39 ms per image, decoding twice), against a
negligible pass over uint8 pixels on the GPU.

Sharding: FFCV's own `distributed=True` takes rank and world size from the torch.distributed process group,
ignoring the ones given here, and pads the last shard with repeated samples (DistributedSampler with
drop_last=False), so ranks overlap. Instead each rank reads its share of the per-epoch permutation every loader
uses (`pipeline.common.epoch_shard`): disjoint shards from the explicit `rank` and `world_size`, no process
group needed, and the same samples per rank and epoch as the reference loader.

Options:
  order       "random": that permutation; "quasi_random": FFCV's page-local shuffle, which reads far less
              from disk when the file does not fit in RAM (one process only; needs os_cache=False).
              Default: quasi_random for one process, random when distributed.
  os_cache    read through the OS page cache (shared by the ranks on a machine) rather than FFCV's own
              process cache. Default: on for "random", off for "quasi_random".
  num_workers FFCV decoding threads (default, as for DALI: every core but one, divided among the ranks on
              this machine, LOCAL_WORLD_SIZE as torchrun sets it). FFCV also sets torch's thread count to it.
  batches_ahead  batches prepared in advance (default 3).
  decode      "once" (default) or "twice", above.

Randomness: crops are drawn inside FFCV's compiled code from numba's per-thread generators, which cannot be
seeded, so unlike the torch loader's the views are not reproducible; flip, jitter, grayscale and blur are
seeded from (seed, epoch, rank, step). A resumed epoch (`set_epoch(epoch, start_step)`) reads exactly the
samples the uninterrupted one would, in the same order.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder
from ffcv.types import ALLOC_TABLE_TYPE

from pipeline.augs import AugRecipe, get_recipe
from pipeline.common import check_start_step, default_workers, derive_seed, epoch_shard, steps_per_epoch
from pipeline.errors import DataError
from pipeline.ffcv_writer import IMAGE_FIELD, LABEL_FIELD
from pipeline.gpu_augment import TwoViewAugment

ORDERS = ("random", "quasi_random")
DECODES = ("once", "twice")
EXPECTED_FIELDS = {IMAGE_FIELD: RGBImageField, LABEL_FIELD: IntField}


def read_beton(path: Path) -> Reader:
    """The file's FFCV reader, or a one-line DataError for a missing, damaged or foreign file.

    FFCV itself would fail later with an assertion, a numpy error, or an out-of-bounds read in compiled code.
    """
    if not path.is_file():
        raise DataError(f"FFCV dataset {path} not found (write one with: python -m pipeline.ffcv_writer DATA {path})")
    try:
        reader = Reader(str(path))
    except (AssertionError, ValueError, IndexError, KeyError, OSError) as e:
        raise DataError(f"{path} is not a readable .beton file ({e or type(e).__name__})") from None
    fields = {name: type(handler) for name, handler in reader.handlers.items()}
    if fields != EXPECTED_FIELDS:
        found = ", ".join(f"{name} ({kind.__name__})" for name, kind in fields.items())
        raise DataError(
            f"{path} has fields {found}; expected {IMAGE_FIELD} (RGBImageField) and {LABEL_FIELD} "
            f"(IntField), as pipeline.ffcv_writer writes"
        )
    check_complete(reader, path)
    return reader


def check_complete(reader: Reader, path: Path) -> None:
    """Every sample's metadata present and every image's bytes inside the file: what a truncated copy lacks."""
    data_end, file_size = int(reader.header["alloc_table_ptr"]), path.stat().st_size
    table = reader.alloc_table
    whole = (
        len(reader.metadata) == reader.num_samples
        and data_end <= file_size
        and (file_size - data_end) % ALLOC_TABLE_TYPE.itemsize == 0
    )
    if whole:
        image_ptrs = field_values(reader, IMAGE_FIELD)["data_ptr"]
        whole = bool(np.all(table["ptr"] + table["size"] <= data_end) and np.isin(image_ptrs, table["ptr"]).all())
    if not whole:
        raise DataError(
            f"{path} is truncated or corrupt: its sample table does not match its size "
            f"({file_size} bytes); write it again"
        )


def field_values(reader: Reader, name: str) -> np.ndarray:
    """One field's per-sample metadata (for IntField, the values themselves)."""
    return reader.metadata[reader.metadata.dtype.names[reader.field_names.index(name)]]


class ShardOrder(TraversalOrder):
    """FFCV traversal order: this rank's share of the torch loader's permutation of epoch `epoch`."""

    def __init__(self, loader: Loader, rank: int, world_size: int, seed: int):
        super().__init__(loader)
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices[epoch_shard(len(self.indices), self.rank, self.world_size, self.seed, epoch).numpy()]


class FromStep(TraversalOrder):
    """Any FFCV traversal order, cut to whole batches and, for the next epoch only, started at a given step: a
    resumed epoch skips the samples it already trained on without reading them."""

    def __init__(self, loader: Loader, inner: TraversalOrder, steps: int):
        super().__init__(loader)
        self.inner, self.steps, self.batch_size = inner, steps, loader.batch_size
        self.start_step = 0

    def sample_order(self, epoch: int) -> np.ndarray:
        start, self.start_step = self.start_step, 0
        return self.inner.sample_order(epoch)[start * self.batch_size : self.steps * self.batch_size]


class TwoViewCropDecoder(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder, decoding once and cropping twice: samples are (2, H, W, 3)."""

    def declare_state_and_memory(self, previous_state):
        state, (_, decode_buffer) = super().declare_state_and_memory(previous_state)
        shape = (2, *state.shape)
        return replace(state, shape=shape), (AllocationQuery(shape, state.dtype), decode_buffer)

    def generate_code(self):
        """FFCV's decode loop (ffcv/fields/rgb_image.py, ResizedCropRGBImageDecoder) with a second crop."""
        jpg = IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        scale, ratio = np.array(self.scale), np.array(self.ratio)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for view in range(2):
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix, view])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


def view_pipelines(recipe: AugRecipe, image_size: int, device: torch.device, decode: str) -> dict[str, PipelineSpec]:
    """The loader's image outputs: `views`, uint8 (B, 2, H, W, 3) on `device`, or `im_q` and `im_k`, uint8
    channels_last NCHW batches on `device`, one decode each."""
    size, crop = (image_size, image_size), dict(scale=recipe.crop_scale, ratio=recipe.crop_ratio)
    if decode == "once":
        return {
            "views": PipelineSpec(
                IMAGE_FIELD,
                transforms=[TwoViewCropDecoder(size, **crop), ToTensor(), ToDevice(device, non_blocking=True)],
            )
        }
    return {
        view: PipelineSpec(
            IMAGE_FIELD,
            transforms=[
                RandomResizedCropRGBImageDecoder(size, **crop),
                ToTensor(),
                ToDevice(device, non_blocking=True),
                ToTorchImage(channels_last=True),
            ],
        )
        for view in ("im_q", "im_k")
    }


def label_pipeline(device: torch.device) -> list:
    return [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]


def resolve_order(order: str | None, os_cache: bool | None, world_size: int) -> tuple[str, bool]:
    """The order and cache to use, defaults filled in, impossible pairs refused."""
    order = order or ("random" if world_size > 1 else "quasi_random")
    if order not in ORDERS:
        raise ValueError(f"unknown FFCV order {order!r}; choose one of: {', '.join(ORDERS)}")
    os_cache = order == "random" if os_cache is None else os_cache
    if order == "quasi_random" and (os_cache or world_size > 1):
        raise ValueError("FFCV order 'quasi_random' needs os_cache=False and a single process (world_size=1)")
    return order, os_cache


class FFCVLoader:
    """Iterates (im_q, im_k, labels) on the device; `set_epoch` picks the shuffle, else epochs advance."""

    def __init__(self, loader: Loader, augment: TwoViewAugment, *, steps: int, rank: int, seed: int):
        self.loader, self.augment = loader, augment
        self.steps, self.rank, self.seed = steps, rank, seed
        self.order = loader.traversal_order = FromStep(loader, loader.traversal_order, steps)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.next_epoch, self.order.start_step = epoch, check_start_step(start_step, self.steps)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        epoch, first = self.loader.next_epoch, self.order.start_step
        for step, (labels, *views) in enumerate(self.loader, start=first):  # the file's fields, then extra outputs
            if len(views) == 1:  # decode once: (B, 2, H, W, 3) -> two NCHW views of it, no copy
                views = views[0].permute(1, 0, 4, 2, 3).unbind(0)
            self.augment.reseed(derive_seed(self.seed, epoch, self.rank, step))  # so a resumed step draws the same
            im_q, im_k = self.augment(*views)
            # FFCV reuses its output buffers a few batches later; the views are fresh tensors, labels need a copy.
            yield im_q, im_k, labels.clone()


def make_ffcv_loader(
    path: Path,
    *,
    batch_size: int,
    image_size: int,
    device: torch.device,
    recipe: AugRecipe,
    rank: int,
    world_size: int,
    seed: int,
    order: str,
    os_cache: bool,
    num_workers: int,
    batches_ahead: int,
    decode: str,
) -> Loader:
    """FFCV's half of the work: batches of labels and uint8 cropped views (see `view_pipelines`) on `device`."""
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=num_workers,
        os_cache=os_cache,
        order=OrderOption.QUASI_RANDOM if order == "quasi_random" else OrderOption.SEQUENTIAL,
        seed=seed,
        drop_last=True,
        batches_ahead=batches_ahead,
        pipelines={
            LABEL_FIELD: label_pipeline(device),
            IMAGE_FIELD: None,
            **view_pipelines(recipe, image_size, device, decode),
        },
    )
    if order == "random":
        # ffcv 1.0.2 cannot take a TraversalOrder class as `order` (it tests isinstance on the class), so the
        # sequential order it was built with is swapped for the sharded one here.
        loader.traversal_order = ShardOrder(loader, rank, world_size, seed)
        loader.first_traversal_order = loader.next_traversal_order()
    return loader


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
    order=None,
    os_cache=None,
    num_workers=None,
    batches_ahead=3,
    decode="once",
):
    if decode not in DECODES:
        raise ValueError(f"unknown FFCV decode strategy {decode!r}; choose one of: {', '.join(DECODES)}")
    path = Path(data)
    reader = read_beton(path)
    order, os_cache = resolve_order(order, os_cache, world_size)
    steps = steps_per_epoch(int(reader.num_samples), batch_size, world_size)
    recipe, device = get_recipe(aug), torch.device(device)
    loader = make_ffcv_loader(
        path,
        batch_size=batch_size,
        image_size=image_size,
        device=device,
        recipe=recipe,
        rank=rank,
        world_size=world_size,
        seed=seed,
        order=order,
        os_cache=os_cache,
        num_workers=num_workers or default_workers(),
        batches_ahead=batches_ahead,
        decode=decode,
    )
    augment = TwoViewAugment(recipe, device=device, dtype=dtype)
    return FFCVLoader(loader, augment, steps=steps, rank=rank, seed=seed)

"""The DALI loader: one DALI pipeline per rank reads, decodes and augments both MoCo views.

With a CUDA `device` the JPEGs are decoded by the `mixed` decoder (nvJPEG, hardware decoder where present) and every
op runs on the GPU; with `device='cpu'` the same graph (`two_view_pipeline`, one function with a `gpu` flag) runs on
DALI's CPU threads, which is how it is tested on machines without a GPU.

Order and seeds. Each epoch gets a freshly built pipeline whose file reader is handed this rank's files for that
epoch, in order: exactly the reference loader's shard (`epoch_batches_shard`), whole batches only, so the last
partial batch is dropped before DALI sees it and no batch is ever padded or straddles two epochs. Every random op is
seeded from (seed, epoch, rank). DALI's reader options cannot do this: `random_shuffle` draws from a buffer with the
reader's seed and `shuffle_after_epoch` reshuffles from an internal epoch counter, so neither can be told "epoch 37"
after a resume; and `shard_id`/`num_shards` would have every rank pass, and DALI parse, the whole file list every
epoch (1.3 s for ImageNet's 1.28M paths on a slow core, against 0.2 s for one rank's eighth). Building a pipeline
takes a fraction of a second, an epoch minutes. Random ops are seeded per pipeline, not per image, so a view depends
on its place in the batch too: a run repeats exactly for the same seed, batch size and world size (any thread count,
checked on CPU; on a GPU, decoded pixels may also depend on which nvJPEG backend, hardware or CUDA, gets each
image).

Fashion-MNIST (arrays, not JPEG files) enters through `fn.external_source` in the same order, is upscaled to
`image_size` as `FashionMNIST.load` does, and then goes through the same crop and augmentation ops.

DALI's decoder reads every image format that counts as one (`pipeline.datasets.IMAGE_EXTENSIONS`) but GIF, so a
dataset with GIFs is refused in one line (`refuse_gifs`); it scales 16-bit PNGs to 8 bits as the other loaders do
(`pipeline.datasets.to_rgb`).
"""

from __future__ import annotations

import collections
import itertools
import sys

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from pipeline.augs import AugRecipe, get_recipe
from pipeline.common import check_start_step, default_workers, derive_seed, epoch_shard, steps_per_epoch, to_step_layout
from pipeline.datasets import FashionMNIST, ImageFolderFiles, is_gif, resolve_dataset
from pipeline.errors import DataError

READER = "Reader"
DECODE_STRATEGIES = ("once", "roi")

# DALI has no bfloat16: bf16 views leave DALI as fp32 and torch rounds them once (`to_step_layout`).
OUTPUT_TYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}

# The HSV hexcone's channel offsets, in sextants: R = 5, G = 3, B = 1 (see `adjust_hue`).
HUE_SEXTANT_OFFSETS = np.array([5.0, 3.0, 1.0], dtype=np.float32)


# --- augmentation ops: one view, uint8 HWC in and out (PIL's per-op rounding and clipping), on either device ---


def uniform(low: float, high: float):
    """A per-sample draw from [low, high] (DALI's `range` must not be empty, so low == high is a one-value draw)."""
    return fn.random.uniform(range=[low, high]) if low < high else fn.random.uniform(values=[low])


def coin(probability: float):
    """A per-sample predicate for DALI conditionals (`if coin(p):` is torchvision's RandomApply(p))."""
    return fn.random.coin_flip(probability=probability, dtype=types.BOOL)


def adjust_brightness(images, factor):
    """PIL's ImageEnhance.Brightness: scale, round, clip."""
    return fn.brightness(images, brightness=factor)


def adjust_contrast(images, factor):
    """PIL's ImageEnhance.Contrast: blend with the mean luma of the image. DALI's `contrast` centres on mid-range
    (128) instead; and on the GPU the mean is a GPU tensor, which named arguments cannot take, hence arithmetic."""
    luma = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    mean = fn.reductions.mean(luma, keep_dims=True)
    return fn.cast(mean + (images - mean) * factor, dtype=types.UINT8)


def adjust_saturation(images, factor):
    """DALI scales chroma about the luma axis, which is PIL's ImageEnhance.Color (a blend with the L image)."""
    return fn.saturation(images, saturation=factor)


def adjust_hue(images, turns):
    """torchvision's hue shift: rotate H in the HSV hexcone by `turns` of a full turn.

    DALI's `hue`/`hsv` rotate chroma in YIQ, a different transform (8-14 levels mean, up to 80 levels apart from
    torchvision on photos at hue shifts of 0.05-0.4), so the hexcone is computed here: with V = max, C = max - min and
    H in sextants, channel n is V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + H) mod 6, n = 5, 3, 1 for R, G, B.
    """
    rgb = fn.cast(images, dtype=types.FLOAT)
    r, g, b = rgb[:, :, 0:1], rgb[:, :, 1:2], rgb[:, :, 2:3]
    value = dmath.max(dmath.max(r, g), b)
    chroma = value - dmath.min(dmath.min(r, g), b)
    divisor = dmath.max(chroma, 1e-6)  # grey pixels (chroma 0) keep any hue; this only avoids 0/0
    red_max, green_max = value == r, (value == g) & (value != r)
    blue_max = (value != g) & (value != r)
    sextant = (
        red_max * ((g - b) / divisor)
        + green_max * (2.0 + (b - r) / divisor)
        + blue_max * (4.0 + (r - g) / divisor)
        + 6.0 * turns
    )
    k = types.Constant(HUE_SEXTANT_OFFSETS) + sextant
    k = k - 6.0 * dmath.floor(k / 6.0)
    return fn.cast(value - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0), dtype=types.UINT8)


def jitter_ops(recipe: AugRecipe) -> list:
    """(op, random factor) for each ColorJitter op the recipe enables, with torchvision's factor ranges."""
    ops = []
    for op, strength in (
        (adjust_brightness, recipe.brightness),
        (adjust_contrast, recipe.contrast),
        (adjust_saturation, recipe.saturation),
    ):
        if strength > 0:
            ops.append((op, uniform(max(0.0, 1 - strength), 1 + strength)))
    if recipe.hue > 0:
        ops.append((adjust_hue, uniform(-recipe.hue, recipe.hue)))
    return ops


def color_jitter(images, recipe: AugRecipe):
    """torchvision's ColorJitter: each sample applies the enabled ops in its own random order.

    The order matters only through the clipping between ops and the hexcone hue (which changes luma), but it is
    cheap: one random permutation index per sample, then per slot the op it names, as DALI conditionals.
    """
    ops = jitter_ops(recipe)
    orders = list(itertools.permutations(range(len(ops))))
    order = fn.random.choice(len(orders))
    for slot in range(len(ops)):
        selected = fn.lookup_table(
            order, keys=list(range(len(orders))), values=[o[slot] for o in orders], dtype=types.INT32
        )
        for index, (op, factor) in enumerate(ops):
            if selected == index:
                images = op(images, factor)
    return images


def grayscale(images):
    """PIL's convert('L') (ITU-R 601 luma), replicated to three channels like torchvision's RandomGrayscale."""
    luma = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(luma, luma, luma, axis=2)


def pil_blur_sigma(sigma):
    """The sigma of DALI's blur whose kernel has the variance of PIL's GaussianBlur(radius=sigma), exactly sigma^2.

    PIL runs three box blurs of that variance (7-13 px for sigma in [0.1, 2]); DALI samples a true Gaussian over its
    default window, 2 * ceil(3 sigma') + 1 px (3-13 px): the same reach. Above sigma 0.55 the sampled Gaussian's
    variance is sigma^2 within 2%. Below, its tails fall between the taps and it is narrower (at sigma 0.2 it would
    not blur at all), so sigma' solves 2e / (1 + 2e) = sigma^2 with e = exp(-1 / (2 sigma'^2)): the variance of a
    3-tap Gaussian, which is all the window holds there (the next taps weigh under 0.4%).
    """
    small = dmath.min(sigma, 0.55)
    variance = small * small
    return dmath.max(dmath.rsqrt(2.0 * dmath.log(2.0 * (1.0 - variance) / variance)), sigma)


def gaussian_blur(images, sigma_range: tuple[float, float]):
    return fn.gaussian_blur(images, sigma=pil_blur_sigma(uniform(*sigma_range)))


def flip_and_normalize(images, recipe: AugRecipe, output_type):
    """Horizontal flip with flip_prob, ImageNet normalisation, cast: NHWC out, which is NCHW channels_last to torch."""
    return fn.crop_mirror_normalize(
        images,
        dtype=output_type,
        output_layout="HWC",
        mirror=fn.random.coin_flip(probability=recipe.flip_prob),
        mean=[255 * m for m in recipe.mean],
        std=[255 * s for s in recipe.std],
    )


def augment(view, recipe: AugRecipe, output_type):
    """The reference `view_transform` after the crop: jitter p, grayscale p, blur p, flip, normalise."""
    if recipe.jitter_prob > 0:
        if coin(recipe.jitter_prob):
            view = color_jitter(view, recipe)
    if coin(recipe.grayscale_prob):
        view = grayscale(view)
    if recipe.blur_prob > 0:
        if coin(recipe.blur_prob):
            view = gaussian_blur(view, recipe.blur_sigma)
    return flip_and_normalize(view, recipe, output_type)


def random_resized_crop(images, recipe: AugRecipe, image_size: int):
    """torchvision's RandomResizedCrop: 10 tries at an area and log-uniform aspect ratio, antialiased bilinear."""
    return fn.random_resized_crop(
        images,
        size=[image_size, image_size],
        random_area=list(recipe.crop_scale),
        random_aspect_ratio=list(recipe.crop_ratio),
        num_attempts=10,
    )


# --- what the pipeline reads: JPEG files through the file reader, or Fashion-MNIST arrays ---


def read_jpegs(dataset, shard: np.ndarray):
    """JPEG bytes and labels of this rank's `shard`, in its order."""
    return fn.readers.file(
        files=[dataset.samples[i][0] for i in shard], labels=dataset.targets[shard].tolist(), name=READER
    )


def read_fashion_mnist(dataset: FashionMNIST, shard: np.ndarray):
    """28x28x1 uint8 images and labels of this rank's `shard`, fed sample by sample in its order."""

    def sample(info):
        if info.idx_in_epoch >= len(shard):
            raise StopIteration
        index = shard[info.idx_in_epoch]
        return dataset.images[index][:, :, None], np.array([dataset.targets[index]], dtype=np.int32)

    return fn.external_source(source=sample, num_outputs=2, batch=False, layout=["HWC", ""])


def fashion_mnist_views(pixels, recipe: AugRecipe, image_size: int, gpu: bool):
    """Upscaled to image_size and made RGB first, as `FashionMNIST.load` does for the reference loader."""
    images = fn.resize(pixels.gpu() if gpu else pixels, size=[image_size, image_size])
    images = fn.color_space_conversion(images, image_type=types.GRAY, output_type=types.RGB)
    return [random_resized_crop(images, recipe, image_size) for _ in range(2)]


def jpeg_views(jpegs, recipe: AugRecipe, image_size: int, gpu: bool, decode: str, decoder_options: dict):
    """The two crops, decoded once and cropped twice, or decoded twice with ROI decoding of just each crop.

    "once" is the default: both crops of an image need most of its entropy-coded data anyway (ROI decoding skips
    the IDCT outside the crop, not the Huffman decoding before it), so two ROI decodes do more work than one full one.
    On CPU threads "once" reads 1.4x as many images per second at 224 px; on a GPU,
    `python -m benchmarks loader --backend dali --loader-option decode=roi` times the other (no GPU figure yet).
    """
    device = "mixed" if gpu else "cpu"
    options = decoder_options if gpu else {}  # nvJPEG preallocation and the hardware decoder are mixed-only
    if decode == "roi":
        return [
            fn.resize(
                fn.decoders.image_random_crop(
                    jpegs,
                    device=device,
                    output_type=types.RGB,
                    random_area=list(recipe.crop_scale),
                    random_aspect_ratio=list(recipe.crop_ratio),
                    num_attempts=10,
                    **options,
                ),
                size=[image_size, image_size],
            )
            for _ in range(2)
        ]
    images = fn.decoders.image(jpegs, device=device, output_type=types.RGB, **options)
    return [random_resized_crop(images, recipe, image_size) for _ in range(2)]


@pipeline_def(enable_conditionals=True, exec_dynamic=True)
def two_view_pipeline(dataset, shard, recipe, image_size, gpu, decode, output_type, decoder_options):
    """(view q, view k, labels) of the samples in `shard`: the same graph on the GPU or on CPU threads."""
    if isinstance(dataset, FashionMNIST):
        pixels, labels = read_fashion_mnist(dataset, shard)
        views = fashion_mnist_views(pixels, recipe, image_size, gpu)
    else:
        jpegs, labels = read_jpegs(dataset, shard)
        views = jpeg_views(jpegs, recipe, image_size, gpu, decode, decoder_options)
    im_q, im_k = (augment(view, recipe, output_type) for view in views)
    # On the GPU the labels leave DALI as a device tensor, copied by DALI ahead of the step rather than by torch from
    # pageable memory at it; and no output leaves DALI pinned (DLPack's kDLCUDAHost, which torch cannot import).
    return im_q, im_k, labels.gpu() if gpu else labels


# --- the loader ---


def epoch_batches_shard(
    num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int
) -> np.ndarray:
    """This rank's samples this epoch, in order: the reference loader's shard less the dropped partial batch."""
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    return epoch_shard(num_samples, rank, world_size, seed, epoch)[: steps * batch_size].numpy()


def to_torch(tensor_list) -> torch.Tensor:
    """Zero-copy: the dynamic executor's output buffers live as long as their DLPack consumer (see `InFlight`)."""
    return torch.from_dlpack(tensor_list.as_tensor())


def unreadable_file(dataset, in_flight: np.ndarray) -> DataError | None:
    """DALI's decoder errors do not name the file: decode the samples in flight with PIL to find it, or the GIF
    among them (named as another format: `refuse_gifs` finds the others)."""
    for index in in_flight:
        try:
            dataset.load(int(index))
        except DataError as error:  # "unreadable image PATH: reason"
            return error
        if isinstance(dataset, ImageFolderFiles) and is_gif(dataset.samples[index][0]):
            return gif_error(dataset.samples[index][0], 1)
    return None


def gif_error(path: str, count: int) -> DataError:
    held = f"{path} is one" if count == 1 else f"the data holds {count}, e.g. {path}"
    return DataError(f"the dali loader cannot decode GIF images and {held}: convert them to PNG, or use --loader torch")


def refuse_gifs(dataset) -> None:
    """GIFs count as images (pipeline.datasets.IMAGE_EXTENSIONS: PIL reads them), but DALI's decoder does not."""
    if isinstance(dataset, ImageFolderFiles):
        gifs = [path for path, _ in dataset.samples if path.lower().endswith(".gif")]
        if gifs:
            raise gif_error(gifs[0], len(gifs))


class InFlight:
    """Keeps the zero-copy views of each batch alive until the device work that reads them has run.

    The views share DALI's buffers, which DALI may reuse once torch lets go of them; but on a GPU the step that
    reads a batch is only queued after the batch is handed out. So a batch is `release`d when the consumer comes
    back for the next one (it has queued its step on this one by then) or stops: an event recorded on torch's
    stream at that moment follows the step, and the batch is let go once the event has passed (`query`, no wait).
    Only when more than `limit` batches are still unfinished does the host wait for the oldest: the GPU is that far
    behind anyway. On the CPU every op has finished when it returns, so nothing is held.
    """

    def __init__(self, device: torch.device, limit: int = 8):
        self.device, self.limit = device, limit
        self.held: collections.deque = collections.deque()

    def release(self, batch: tuple) -> None:
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.held.append((batch, event))
        while self.held and (self.held[0][1].query() or len(self.held) > self.limit):
            self.held.popleft()[1].synchronize()


class DaliLoader:
    """Iterates (im_q, im_k, labels) on the device; `set_epoch` picks the epoch and first step, else epochs advance.

    Resumption: `state_dict()` is DALI's own pipeline checkpoint (reader position, every random generator) after the
    last batch handed out; with it, `set_epoch(epoch, step)` continues bit-exactly. Without one, a start step still
    reads exactly the samples after it, with fresh random draws.
    """

    def __init__(
        self,
        dataset,
        recipe: AugRecipe,
        *,
        batch_size,
        image_size,
        device,
        dtype,
        rank,
        world_size,
        seed,
        decode,
        num_threads,
        prefetch_queue_depth,
        decoder_options,
    ):
        self.dataset, self.recipe, self.image_size = dataset, recipe, image_size
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.dtype, self.decode = device, dtype, decode
        self.num_threads, self.prefetch_queue_depth = num_threads, prefetch_queue_depth
        self.decoder_options = decoder_options
        self.steps = steps_per_epoch(len(dataset), batch_size, world_size)
        self.epoch, self.start_step, self.restore, self.skipped = 0, 0, None, 0
        self.pipe = None
        self.in_flight = InFlight(device)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, check_start_step(start_step, self.steps)

    def state_dict(self) -> dict:
        """The running pipeline's checkpoint (what comes after the last batch handed out), and how many steps its
        reader's file list left out at the front (a pipeline built for a resumed epoch without a checkpoint)."""
        return {"pipeline": self.pipe.checkpoint(), "skipped_steps": self.skipped} if self.pipe is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration (the epoch and start step given to `set_epoch`) continues from this checkpoint."""
        self.restore = (state["pipeline"], state["skipped_steps"]) if "pipeline" in state else None

    def pipeline(self, shard: np.ndarray, epoch: int, checkpoint: bytes | None):
        gpu = self.device.type == "cuda"
        pipe = two_view_pipeline(
            self.dataset,
            shard,
            self.recipe,
            self.image_size,
            gpu,
            self.decode,
            OUTPUT_TYPES[self.dtype],
            self.decoder_options,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if gpu else None,
            seed=derive_seed(self.seed, epoch, self.rank),
            prefetch_queue_depth=self.prefetch_queue_depth,
            enable_checkpointing=True,
            checkpoint=checkpoint,
        )
        pipe.build()
        return pipe

    def run(self, pipe, shard: np.ndarray, step: int):
        """One batch. A failure is DALI's error (the pipeline stops, it never hangs), or a DataError naming the file
        when one of the batches in flight does not decode with PIL either."""
        try:
            return pipe.run()
        except RuntimeError:
            in_flight = shard[step * self.batch_size : (step + self.prefetch_queue_depth + 1) * self.batch_size]
            error = unreadable_file(self.dataset, in_flight)
            if error is None:
                raise
            raise error from None

    def __iter__(self):
        try:
            shard = epoch_batches_shard(
                len(self.dataset), self.batch_size, self.rank, self.world_size, self.seed, self.epoch
            )
            start, restore, self.restore = self.start_step, self.restore, None
            # The reader is handed the samples from `skipped` on: from `start` without a saved reader position; with
            # one, the same list as the pipeline that saved it.
            checkpoint, self.skipped = restore or (None, start)
            shard, start_in_shard = shard[self.skipped * self.batch_size :], start - self.skipped
            # The last epoch's pipeline goes first: nothing else refers to it, so it is shut down here and its
            # buffers return to DALI's memory pools, from which the next one allocates (two are never alive at once).
            self.pipe = None
            self.pipe = self.pipeline(shard, self.epoch, checkpoint)
            for step in range(start_in_shard, start_in_shard + self.steps - start):
                im_q, im_k, labels = self.run(self.pipe, shard, step)
                views = to_torch(im_q).permute(0, 3, 1, 2), to_torch(im_k).permute(0, 3, 1, 2), to_torch(labels)
                try:  # labels are already on the device (a GPU output there, see `two_view_pipeline`)
                    yield (
                        *(to_step_layout(v, self.device, self.dtype) for v in views[:2]),
                        views[2].view(-1).to(torch.int64),
                    )
                finally:  # the consumer has queued its step on this batch, or stopped
                    self.in_flight.release(views)
        finally:  # also when the consumer stops early: the next iteration is the next epoch, from its start
            self.epoch, self.start_step = self.epoch + 1, 0


def pipeline_device(device) -> torch.device:
    """The device DALI runs on: CPU threads for 'cpu', and for 'cuda' on a machine without one (with a notice)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"dali loader: {device} requested but CUDA is not available; running the pipeline on CPU", file=sys.stderr
        )
        return torch.device("cpu")
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.type != "cpu":
        raise ValueError(f"the dali loader runs on 'cpu' or 'cuda', not {device}")
    return device


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
    decode="once",
    num_workers=None,
    prefetch_queue_depth=2,
    hw_decoder_load=0.65,
    device_memory_padding=211025920,
    host_memory_padding=140544512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
    verify=True,
):
    """The `dali` backend. `decode`: "once" (decode, crop twice) or "roi" (two ROI decodes; JPEG data only).
    `num_workers`: DALI's CPU threads (train.py's --workers, as for the other loaders).
    `hw_decoder_load`, `device_memory_padding`, `host_memory_padding`, `preallocate_width_hint`,
    `preallocate_height_hint`: the mixed decoder's hardware-decoder share, nvJPEG's preallocation per thread (one
    device buffer, two pinned host buffers) and the hardware decoder's for the largest image. The defaults are DALI's
    ResNet-50 ImageNet example's, so no buffer grows mid-epoch on ImageNet; per DALI thread and decoder ("roi" has
    two) they cost 201 MiB of device and 268 MiB of pinned host memory: lower them for small images or many ranks."""
    if decode not in DECODE_STRATEGIES:
        raise ValueError(f"unknown decode strategy {decode!r}; choose one of: {', '.join(DECODE_STRATEGIES)}")
    if dtype not in OUTPUT_TYPES:
        raise ValueError(f"the dali loader outputs {', '.join(map(str, OUTPUT_TYPES))}, not {dtype}")
    dataset = resolve_dataset(data, "train", image_size, verify)
    refuse_gifs(dataset)
    decoder_options = dict(
        hw_decoder_load=hw_decoder_load,
        device_memory_padding=device_memory_padding,
        host_memory_padding=host_memory_padding,
        preallocate_width_hint=preallocate_width_hint,
        preallocate_height_hint=preallocate_height_hint,
    )
    return DaliLoader(
        dataset,
        get_recipe(aug),
        batch_size=batch_size,
        image_size=image_size,
        device=pipeline_device(device),
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        seed=seed,
        decode=decode,
        num_threads=num_workers or default_workers(),
        prefetch_queue_depth=prefetch_queue_depth,
        decoder_options=decoder_options,
    )

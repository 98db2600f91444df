"""Files in, two normalised channels_last views on the target device out.

`build_loader(backend, data, ...)` is the one entry point. Every backend yields `(im_q, im_k, labels)`
on `device`, normalised with the ImageNet mean/std, channels_last, in `dtype`; `len()` is the number
of steps per epoch; each rank reads a disjoint shard; the last partial batch is dropped; the loader
can be iterated once per epoch (`set_epoch(e, start_step)` fixes which epoch, and from which step, comes next;
`state_dict()` / `load_state_dict()` carry what an exact resumption needs: see `pipeline.common`).
"""

from __future__ import annotations

import importlib

# Backend name -> module with a `build(data, *, batch_size, image_size, device, aug, rank, world_size,
# seed, **options)` function. Modules are imported on use, so a missing DALI or FFCV only matters
# to those who ask for it.
LOADERS = {
    "torch": "pipeline.torch_loader",
    "dali": "pipeline.dali_loader",
    "ffcv": "pipeline.ffcv_loader",
    "synthetic": "pipeline.synthetic",
}


def build_loader(backend, data, *, batch_size, image_size, device, aug="v2", rank=0, world_size=1, seed=0, **options):
    if backend not in LOADERS:
        raise ValueError(f"unknown loader {backend!r}; choose one of: {', '.join(LOADERS)}")
    module = importlib.import_module(LOADERS[backend])
    return module.build(
        data,
        batch_size=batch_size,
        image_size=image_size,
        device=device,
        aug=aug,
        rank=rank,
        world_size=world_size,
        seed=seed,
        **options,
    )

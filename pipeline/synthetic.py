"""Random on-device batches: the MoCo step measured without any data loading."""

from __future__ import annotations

import torch

from pipeline.common import check_start_step, derive_seed


class SyntheticLoader:
    """`steps` batches cycled from two pre-made random batches, so generating them costs nothing per step."""

    def __init__(self, *, batch_size, image_size, device, dtype, seed, steps):
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)

        def views():
            x = torch.randn(batch_size, 3, image_size, image_size, device=device, generator=gen)
            return x.to(dtype=dtype, memory_format=torch.channels_last)

        labels = torch.randint(0, 1000, (batch_size,), device=device, generator=gen)
        self.batches = [(views(), views(), labels) for _ in range(2)]
        self.steps, self.start_step = steps, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start_step = check_start_step(start_step, self.steps)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        start, self.start_step = self.start_step, 0
        for step in range(start, self.steps):
            yield self.batches[step % 2]


def build(
    data, *, batch_size, image_size, device, aug="v2", rank=0, world_size=1, seed=0, dtype=torch.float32, steps=100
):
    return SyntheticLoader(
        batch_size=batch_size,
        image_size=image_size,
        device=device,
        dtype=dtype,
        seed=derive_seed(seed, 0, rank),
        steps=steps,
    )

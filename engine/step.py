"""One MoCo training step: forward both encoders, InfoNCE in fp32, backward, optimizer. No host syncs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.moco import no_stage

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
NEVER = 2**62  # `first_nonfinite` until a step's loss is not finite


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


class StepCounters:
    """What the trainer learns about the steps, kept on the device so that no step reads anything back: steps
    run, steps whose loss was not finite and the index of the first, and the steps fp16's GradScaler skipped
    because their gradients were not finite. The trainer reads them every --print-freq steps."""

    def __init__(self, device: torch.device):
        zero = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        self.steps, self.nonfinite, self.skipped = zero(), zero(), zero()
        self.first_nonfinite = torch.full((), NEVER, dtype=torch.long, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.steps, self.nonfinite, self.skipped, self.first_nonfinite]

    def count(self, loss: torch.Tensor) -> None:
        """Scalar bookkeeping on the device (a cast and a copy of one element each: the step's only copies here)."""
        bad = ~torch.isfinite(loss)
        self.nonfinite += bad.long()
        self.first_nonfinite.copy_(
            torch.where(bad, torch.minimum(self.first_nonfinite, self.steps), self.first_nonfinite)
        )
        self.steps += 1


class MocoStep:
    """Runs a step; under fp16 the GradScaler skips a step whose gradients are not finite, and that is counted."""

    def __init__(
        self,
        model,
        optimizer,
        precision: str,
        device: torch.device,
        fused_loss: bool,
        stage=no_stage,
        memory_format=torch.channels_last,
    ):
        self.model, self.optimizer, self.device, self.stage = model, optimizer, device, stage
        self.fused_loss, self.memory_format = fused_loss, memory_format
        self.amp_dtype = AMP_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.counters = StepCounters(device)

    def __call__(self, im_q, im_k) -> torch.Tensor:
        # Loaders hand over channels_last views; a contiguous-format step gets them converted (a copy) here.
        im_q, im_k = (
            im_q.contiguous(memory_format=self.memory_format),
            im_k.contiguous(memory_format=self.memory_format),
        )
        # No weight-cast cache: each weight is cast once per forward anyway, and a cache breaks CUDA graphs.
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None, cache_enabled=False
        ):
            output = self.model(im_q, im_k, fused_loss=self.fused_loss)
        with self.stage("loss"):
            loss = output if self.fused_loss else F.cross_entropy(*output)
            self.counters.count(loss)
        with self.stage("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with self.stage("optimizer"):
            self.scaler.step(self.optimizer)
            if self.scaler.is_enabled():
                found_inf = self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
                self.counters.skipped += sum(found_inf.values()).long()
            self.scaler.update()
        return loss.detach()

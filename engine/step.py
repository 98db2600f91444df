"""One MoCo training step: forward both encoders, InfoNCE in fp32, backward, optimizer. No host syncs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.moco import no_stage

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


class MocoStep:
    """Runs a step and counts, on the device, the steps whose loss was not finite (fp16 overflow): the
    GradScaler skips their update, and the trainer logs the count once per epoch."""

    def __init__(self, model, optimizer, precision: str, device: torch.device, fused_loss: bool, stage=no_stage):
        self.model, self.optimizer, self.device, self.stage = model, optimizer, device, stage
        self.fused_loss = fused_loss
        self.amp_dtype = AMP_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self, im_q, im_k) -> torch.Tensor:
        # No weight-cast cache: each weight is cast once per forward anyway, and a cache breaks CUDA graphs.
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            output = self.model(im_q, im_k, fused_loss=self.fused_loss)
        with self.stage("loss"):
            loss = output if self.fused_loss else F.cross_entropy(*output)
            self.nonfinite_steps += (~torch.isfinite(loss)).long()
        with self.stage("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with self.stage("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()

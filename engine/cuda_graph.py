"""The whole MoCo step (both forwards, loss, backward, fused SGD, momentum and queue updates) as one CUDA graph.

Eagerly, a ResNet-50 MoCo step is thousands of kernel launches issued by Python; replayed from a graph it is
one launch, so neither the Python loop nor a loader sharing the process can leave the GPU idle. The step is
capturable because it never syncs with the host: the queue pointer stays on the device, the shuffle's
randperm uses graph-safe RNG, autocast keeps no weight-cast cache, and the learning rate lives in a device
tensor that the fused SGD reads (`set_learning_rate` fills it). Inputs are copied into static buffers.

Limits: one process (DDP's hooks are not captured here), bf16 or fp32 (fp16's GradScaler adjusts on the host),
and the torch SGD optimizer; `engine.config.validate` refuses the rest before any work.
"""

from __future__ import annotations

import torch

from engine.step import MocoStep


class GraphedStep:
    """Runs the first step eagerly and captures the step after it; later calls replay. MocoStep's interface.

    Capture needs a few eager warm-up steps (cuDNN/cuBLAS set-up); every model, buffer and optimizer tensor
    and the device's random state are put back afterwards, so the run trains exactly the steps it would train
    without graphs.
    """

    def __init__(self, step: MocoStep, warmup_steps: int = 3):
        self.step, self.warmup_steps = step, warmup_steps
        self.graph = None

    def __getattr__(self, name: str):
        """optimizer, scaler, counters, model...: the eager step's."""
        return getattr(self.step, name)

    def _state_tensors(self) -> list[torch.Tensor]:
        model, optimizer = self.step.model, self.step.optimizer
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [*model.parameters(), *model.buffers(), *state, *self.step.counters.tensors()]

    def _first_step_and_capture(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=self.step.device)
        self.static_q, self.static_k = im_q.clone(), im_k.clone()
        loss = self.step(im_q, im_k)  # a real step; it also creates the optimizer state the graph will use
        snapshot = [t.clone() for t in self._state_tensors()]
        rng = torch.cuda.get_rng_state(self.step.device)  # the warm-up's shuffles must not use up the run's draws
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self.step(self.static_q, self.static_k)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads (DALI's prefetch, FFCV's copies, pin-memory) keep working meanwhile.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_loss = self.step(self.static_q, self.static_k)
        with torch.no_grad():
            for tensor, saved in zip(self._state_tensors(), snapshot):
                tensor.copy_(saved)
        torch.cuda.set_rng_state(rng, self.step.device)
        return loss

    def __call__(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._first_step_and_capture(im_q, im_k)
        self.static_q.copy_(im_q)
        self.static_k.copy_(im_k)
        self.graph.replay()
        return self.static_loss.clone()

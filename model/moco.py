"""MoCo: a query encoder, its momentum copy (the key encoder), and a queue of past keys.

The interface and state-dict keys are those of the official `moco/builder.py`, so code and checkpoints
carry over. What differs is speed and reach:
  - the momentum update is one multi-tensor lerp over all parameters, not a loop of small kernels;
  - the queue pointer is never read on the host (the official `int(self.queue_ptr)` syncs every step):
    the keys go in with an index_copy_ at device-side columns, which a CUDA graph can also replay;
  - logits and loss inputs are fp32 even when the encoders run in bf16/fp16;
  - `forward(..., fused_loss=True)` returns the InfoNCE loss without building the N x (1+K) logits
    (see infonce.py);
  - Shuffle BN works on one device too (`shuffle="split"`, see split_bn.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from model import distributed
from model.infonce import infonce_loss
from model.split_bn import convert_to_split_bn

SHUFFLE_MODES = ("ddp", "split", "none")


def no_stage(name: str):
    """The default stage marker: nothing. Benchmarks swap in one that times and NVTX-annotates each stage."""
    return nullcontext()


class MoCo(nn.Module):
    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, shuffle="ddp", bn_splits=8):
        """
        base_encoder: callable `num_classes -> nn.Module` with an `fc` head (a torchvision ResNet)
        dim: feature dimension; K: queue size; m: key-encoder momentum; T: softmax temperature
        mlp: a 2-layer MLP head (MoCo v2); shuffle: 'ddp' (the paper's), 'split' or 'none';
        bn_splits: sub-batches (emulated GPUs) per device in 'split' mode
        """
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.shuffle = shuffle
        if self.shuffle not in SHUFFLE_MODES:
            raise ValueError(f"unknown shuffle mode {shuffle!r}; choose one of: {', '.join(SHUFFLE_MODES)}")
        if self.shuffle == "ddp" and distributed.world_size() == 1:
            raise ValueError("shuffle='ddp' needs several processes (torchrun); use 'split' on one device")

        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)
        if self.shuffle == "split":
            convert_to_split_bn(self.encoder_q, bn_splits)
            convert_to_split_bn(self.encoder_k, bn_splits)

        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.stage = no_stage

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """param_k = m * param_k + (1 - m) * param_q, for every parameter in one multi-tensor op."""
        torch._foreach_lerp_(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), 1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = distributed.concat_all_gather(keys)
        batch_size = keys.shape[0]
        if self.K % batch_size:
            raise ValueError(f"queue size K={self.K} is not a multiple of the global batch {batch_size}")
        # Modulo K: a pointer left by a run with another batch size (a resumed checkpoint) wraps around the end.
        columns = (self.queue_ptr + torch.arange(batch_size, device=keys.device)).remainder_(self.K)
        self.queue.index_copy_(1, columns, keys.T)
        self.queue_ptr.add_(batch_size).remainder_(self.K)

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        """Gather the key batch, apply one permutation broadcast from rank 0, keep this rank's slice."""
        x_gather = distributed.concat_all_gather(x)
        idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
        torch.distributed.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(distributed.world_size(), -1)[distributed.rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        x_gather = distributed.concat_all_gather(x)
        idx_this = idx_unshuffle.view(distributed.world_size(), -1)[distributed.rank()]
        return x_gather[idx_this]

    @torch.no_grad()
    def _batch_shuffle_split(self, x):
        """One device: permute the keys so each lands in a random BN sub-batch."""
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        return x[idx_shuffle], torch.argsort(idx_shuffle)  # a gather: the one copy Shuffle BN itself needs

    @torch.no_grad()
    def _compute_keys(self, im_k):
        """Keys from the key encoder, with BN shuffled across (real or emulated) devices."""
        with self.stage("shuffle"):
            if self.shuffle == "ddp":
                im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            elif self.shuffle == "split":
                im_k, idx_unshuffle = self._batch_shuffle_split(im_k)
        with self.stage("key_forward"):
            # The shuffle's gathers and index keep the key batch in the layout it came in.
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
        with self.stage("unshuffle"):
            if self.shuffle == "ddp":
                k = self._batch_unshuffle_ddp(k, idx_unshuffle)
            elif self.shuffle == "split":
                k = k[idx_unshuffle]  # a gather of N x dim keys
        return k

    def _contrastive_logits(self, q, k):
        """fp32 logits: the positive key in column 0, then one column per queued negative."""
        with torch.autocast(device_type=q.device.type, enabled=False):
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
            # A copy: the queue is overwritten before the backward, which needs these negatives.
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return logits, labels

    def forward(self, im_q, im_k, fused_loss=False):
        """
        im_q, im_k: two augmented views of the same images
        returns logits (N x (1+K), fp32) and their targets (all zeros: the positive is column 0);
        with fused_loss, the mean InfoNCE loss itself (equal to cross_entropy(logits, targets))
        """
        with self.stage("query_forward"):
            q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        with torch.no_grad():
            with self.stage("momentum_update"):
                self._momentum_update_key_encoder()
            k = self._compute_keys(im_k)
        if fused_loss:
            with self.stage("loss"), torch.autocast(device_type=q.device.type, enabled=False):
                output = infonce_loss(q, k, self.queue, self.T)
        else:
            with self.stage("logits"):
                output = self._contrastive_logits(q, k)
        with self.stage("queue_update"):
            self._dequeue_and_enqueue(k)
        return output

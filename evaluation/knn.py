"""The kNN monitor: weighted k-nearest-neighbour top-1 on frozen features (Wu et al., 2018, InstDisc).

Each validation image votes with its k most similar memory-bank images, weighted by exp(similarity / T).
It tracks representation quality during pretraining without training anything. Under torchrun every rank
extracts the features of its share of the images and they are gathered, so no rank idles in a collective
while one rank does all the work (20,000 ImageNet images take minutes on one GPU's loader).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.distributed import concat_all_gather
from model.resnet import backbone_features


def labelled_data(data: str, loader: str, knn_data: str | None) -> str | None:
    """The labelled data that evaluates a run (its kNN monitor, the linear probe's default): --knn-data, else
    --data unless that holds no labels (a .beton, the synthetic loader)."""
    return knn_data or (None if data.endswith(".beton") or loader == "synthetic" else data)


@torch.no_grad()
def extract_features(encoder, batches, amp_dtype=None, normalize=True):
    """Backbone features (L2-normalised unless told otherwise) and labels, with the encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, targets in batches():
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            f = backbone_features(encoder, images).float()
            feats.append(F.normalize(f, dim=1) if normalize else f)
        labels.append(targets)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def gather_rows(x: torch.Tensor, shard_sizes: list[int]) -> torch.Tensor:
    """Every rank's rows (rank r holds shard_sizes[r] of them), concatenated in rank order on every rank."""
    if len(shard_sizes) == 1:
        return x
    longest = max(shard_sizes)
    padded = torch.cat([x, x.new_zeros((longest - len(x), *x.shape[1:]))])
    everything = concat_all_gather(padded)
    return torch.cat([everything[r * longest : r * longest + n] for r, n in enumerate(shard_sizes)])


@torch.no_grad()
def knn_top1(bank_feats, bank_labels, feats, labels, k=200, t=0.1, chunk=1024) -> float:
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    k = min(k, len(bank_feats))
    correct = 0
    for start in range(0, len(feats), chunk):
        sim = feats[start : start + chunk] @ bank_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / t).exp())
        correct += (votes.argmax(1) == labels[start : start + chunk]).sum().item()
    return 100.0 * correct / len(feats)


class KnnMonitor:
    """Calling it with the query encoder gives kNN top-1 (%) of `val` against the memory bank `bank`, the same
    figure on every rank."""

    def __init__(self, bank, val, amp_dtype, k: int, t: float):
        self.bank, self.val, self.amp_dtype, self.k, self.t = bank, val, amp_dtype, k, t

    def features(self, encoder, loader) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = extract_features(encoder, loader, self.amp_dtype)
        return gather_rows(feats, loader.shard_sizes), gather_rows(labels, loader.shard_sizes)

    def __call__(self, encoder) -> float:
        return knn_top1(*self.features(encoder, self.bank), *self.features(encoder, self.val), k=self.k, t=self.t)

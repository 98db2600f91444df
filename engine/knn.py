"""The kNN monitor: weighted k-nearest-neighbour top-1 on frozen features (Wu et al., 2018, InstDisc).

Each validation image votes with its k most similar memory-bank images, weighted by exp(similarity / T).
It tracks representation quality during pretraining without training anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.resnet import backbone_features


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

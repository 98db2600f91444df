"""Linear probe on frozen features, in the manner of the official main_lincls.py.

    python -m evaluation.lincls runs/moco/checkpoint_last.pth.tar --data fashion-mnist --image-size 28

As officially: the query encoder is loaded with the `module.encoder_q.` prefix stripped and `fc` dropped,
every layer but a fresh `fc` (weights N(0, 0.01), bias 0) is frozen, BN stays in eval mode, and `fc` is
trained with SGD (lr 30, momentum 0.9, no weight decay, x0.1 at epochs 60 and 80 of 100). Without the
official random crops the frozen features never change, so they are computed once and cached: the same
probe at a fraction of the cost.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from rich.progress import track

from engine.checkpoint import CheckpointError, load_checkpoint, query_encoder_state
from evaluation.data import build_eval_loader
from evaluation.knn import extract_features
from model.resnet import build_encoder
from pipeline.errors import DataError


def load_frozen_encoder(checkpoint: str, arch: str | None) -> torch.nn.Module:
    """The query encoder, frozen, in eval mode; its `fc` is left untrained (the probe brings its own)."""
    ckpt = load_checkpoint(checkpoint)
    model = build_encoder(arch or ckpt.get("arch", "resnet50"), num_classes=1)
    msg = model.load_state_dict(query_encoder_state(ckpt["state_dict"]), strict=False)
    if set(msg.missing_keys) != {"fc.weight", "fc.bias"}:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the encoder: missing {msg.missing_keys}")
    for p in model.parameters():
        p.requires_grad = False
    return model.eval()


def train_linear(fc, feats, labels, epochs, lr, milestones, batch_size, seed):
    fc.weight.data.normal_(mean=0.0, std=0.01)
    fc.bias.data.zero_()
    fc.weight.requires_grad = fc.bias.requires_grad = True
    optimizer = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in track(range(epochs), description="linear probe", transient=True):
        for idx in torch.randperm(len(feats), generator=gen).split(batch_size):
            loss = F.cross_entropy(fc(feats[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="fashion-mnist", help="labelled data with train and val splits")
    parser.add_argument("--arch", default=None, help="encoder architecture (default: the checkpoint's)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=30.0)
    parser.add_argument("--schedule", type=int, nargs="+", default=[60, 80], help="epochs where lr drops x0.1")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-samples", type=int, default=None, help="use a random subset of the train split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    try:
        encoder = load_frozen_encoder(args.checkpoint, args.arch).to(args.device)
        loader = dict(image_size=args.image_size, batch_size=256, device=args.device, seed=args.seed)
        train_batches = build_eval_loader(args.data, "train", max_samples=args.train_samples, **loader)
        val_batches = build_eval_loader(args.data, "val", **loader)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    feats, labels = extract_features(encoder, train_batches, normalize=False)
    val_feats, val_labels = extract_features(encoder, val_batches, normalize=False)
    num_classes = int(labels.max()) + 1
    fc = torch.nn.Linear(feats.shape[1], num_classes).to(args.device)
    train_linear(fc, feats, labels, args.epochs, args.lr, args.schedule, args.batch_size, args.seed)
    with torch.no_grad():
        top1 = 100.0 * (fc(val_feats).argmax(1) == val_labels).float().mean().item()
    result = dict(checkpoint=args.checkpoint, data=args.data, top1=top1, epochs=args.epochs, lr=args.lr)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

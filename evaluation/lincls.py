"""Linear probe on frozen features, in the manner of the official main_lincls.py.

    python -m evaluation.lincls runs/moco/checkpoint_last.pth.tar      # the data and image size it was trained with

As officially: the query encoder is loaded with the `module.encoder_q.` prefix stripped and `fc` dropped,
every layer but a fresh `fc` (weights N(0, 0.01), bias 0) is frozen, BN stays in eval mode, and `fc` is
trained with SGD (lr 30, momentum 0.9, no weight decay, x0.1 at epochs 60 and 80 of 100). Without the
official random crops the frozen features never change, so they are computed once and cached: the same
probe at a fraction of the cost. The labelled data and image size are by default those of the run that wrote
the checkpoint (its kNN monitor's data); a checkpoint that does not record them (the official main_moco.py's)
is probed on fashion-mnist at 28 px, with a notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import track

from evaluation.cli import HelpFormatter
from evaluation.data import build_eval_loader
from evaluation.knn import extract_features, labelled_data
from model.checkpoint import CheckpointError, check_writable, load_checkpoint, query_encoder_state
from model.resnet import build_encoder
from pipeline.errors import DataError

# What a checkpoint that does not record its run (the official main_moco.py's) is probed with.
FALLBACK_DATA, FALLBACK_IMAGE_SIZE, FALLBACK_ARCH = "fashion-mnist", 28, "resnet50"


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


def probe_data(args: argparse.Namespace, ckpt: dict) -> tuple[str, int]:
    """--data and --image-size, by default those the checkpoint was trained with, so that the probe never reads
    other data unknowingly: probing other data than the checkpoint's, or a checkpoint that does not say, is
    stated in one notice."""
    trained = (ckpt.get("config") or {}).get("data") or {}
    if "data" not in trained or "image_size" not in trained:
        data = FALLBACK_DATA if args.data is None else args.data
        image_size = FALLBACK_IMAGE_SIZE if args.image_size is None else args.image_size
        if args.data is None or args.image_size is None:
            notice(
                f"checkpoint {args.checkpoint} does not record the data it was trained on (train.py did not write "
                f"it); probing {data} at {image_size} px"
            )
        return data, image_size
    trained_on, trained_size = trained["data"], trained["image_size"]
    labelled = labelled_data(trained_on, trained.get("loader", "torch"), trained.get("knn_data"))
    data = labelled if args.data is None else args.data
    image_size = trained_size if args.image_size is None else args.image_size
    if data is None:
        raise DataError(
            f"checkpoint {args.checkpoint} was trained on {trained_on}, which has no labels, and names no "
            "--knn-data; give --data"
        )
    if data not in (trained_on, labelled) or image_size != trained_size:
        notice(
            f"probing {data} at {image_size} px; checkpoint {args.checkpoint} was trained on {trained_on} at "
            f"{trained_size} px"
        )
    return data, image_size


def misfit(encoder_state: dict, state: dict) -> str | None:
    """How `state` differs from the encoder's own weights (`fc` aside), or None where it fits them."""
    if not state:
        return "it holds no query encoder weights (module.encoder_q.*)"
    expected = {k: v for k, v in encoder_state.items() if not k.startswith("fc.")}
    kinds = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "of another shape": [k for k in expected if k in state and state[k].shape != expected[k].shape],
    }
    return "; ".join(f"{len(keys)} weights {kind} (e.g. {keys[0]})" for kind, keys in kinds.items() if keys) or None


def load_frozen_encoder(ckpt: dict, checkpoint: str, arch: str | None) -> torch.nn.Module:
    """The query encoder, frozen, in eval mode; its `fc` is left untrained (the probe brings its own)."""
    stored_arch = ckpt.get("arch", FALLBACK_ARCH)
    arch = arch or stored_arch
    try:
        model = build_encoder(arch, num_classes=1)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: {e}") from None
    state = query_encoder_state(ckpt["state_dict"])
    problem = misfit(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"checkpoint {checkpoint} (arch {stored_arch}) does not fit the {arch} encoder: {problem}"
        )
    model.load_state_dict(state, strict=False)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by train.py (or the official main_moco.py)")
    parser.add_argument(
        "--data",
        default=None,
        help="labelled data with train and val splits (default: the "
        f"checkpoint's kNN data, else its training data; {FALLBACK_DATA} if it records neither)",
    )
    parser.add_argument(
        "--arch",
        default=None,
        help=f"encoder architecture (default: the checkpoint's; {FALLBACK_ARCH} if it records none)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the probed images, in pixels "
        f"(default: the checkpoint's; {FALLBACK_IMAGE_SIZE} if it records none)",
    )
    parser.add_argument("--epochs", type=int, default=100, help="epochs of training the linear classifier")
    parser.add_argument("--lr", type=float, default=30.0, help="SGD learning rate of the linear classifier")
    parser.add_argument("--schedule", type=int, nargs="+", default=[60, 80], help="epochs where lr drops x0.1")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of the linear classifier's SGD")
    parser.add_argument(
        "--train-samples", type=int, default=None, help="use a random subset of the train split (default: all of it)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where features and the classifier are computed",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the train subset, the batch order and the classifier's init"
    )
    parser.add_argument("--json", default=None, help="also write the result to this file (default: only print it)")
    args = parser.parse_args(argv)
    try:
        if args.json:
            check_writable(Path(args.json))
        ckpt = load_checkpoint(args.checkpoint)
        encoder = load_frozen_encoder(ckpt, args.checkpoint, args.arch).to(args.device)
        data, image_size = probe_data(args, ckpt)
        loader = dict(image_size=image_size, batch_size=256, device=args.device, seed=args.seed)
        train_batches = build_eval_loader(data, "train", max_samples=args.train_samples, **loader)
        val_batches = build_eval_loader(data, "val", **loader)
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
    result = dict(
        checkpoint=args.checkpoint, data=data, image_size=image_size, top1=top1, epochs=args.epochs, lr=args.lr
    )
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

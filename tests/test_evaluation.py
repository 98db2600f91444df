"""Linear probe, exports, and the kNN monitor against brute-force references."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

import train
from evaluation import export, lincls
from evaluation.knn import knn_top1
from model.resnet import build_encoder

TINY = [
    "--epochs",
    "1",
    "--max-steps",
    "2",
    "--batch-size",
    "32",
    "--moco-k",
    "64",
    "--image-size",
    "16",
    "--workers",
    "0",
    "--knn-every",
    "0",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out / "checkpoint_last.pth.tar"


def test_torchvision_export_loads_into_the_encoder(checkpoint, tmp_path):
    assert export.main([str(checkpoint), str(tmp_path / "q.pth"), "--format", "torchvision"]) == 0
    exported = torch.load(tmp_path / "q.pth")
    model = build_encoder("resnet_mini_cifar", num_classes=5)
    missing = model.load_state_dict(exported, strict=False).missing_keys
    assert set(missing) == {"fc.weight", "fc.bias"}
    source = torch.load(checkpoint)["state_dict"]
    torch.testing.assert_close(exported["layer1.0.conv1.weight"], source["module.encoder_q.layer1.0.conv1.weight"])


def test_detectron2_export_uses_the_official_names(checkpoint, tmp_path):
    assert export.main([str(checkpoint), str(tmp_path / "d2.pkl"), "--format", "detectron2"]) == 0
    with open(tmp_path / "d2.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    keys = set(obj["model"])
    for expected in [
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "stem.conv1.norm.running_mean",
        "res2.0.conv1.weight",
        "res2.0.conv1.norm.bias",
        "res3.0.shortcut.weight",
        "res3.0.shortcut.norm.running_var",
        "res5.0.conv2.norm.weight",
        "stem.fc.0.weight",
    ]:
        assert expected in keys, expected
    assert not any(k.startswith(("module", "layer")) or "bn" in k for k in keys)
    source = torch.load(checkpoint)["state_dict"]
    assert (
        obj["model"]["res3.0.shortcut.norm.running_var"]
        == source["module.encoder_q.layer2.0.downsample.1.running_var"].numpy()
    ).all()


def test_linear_probe_learns_fashion_mnist(checkpoint, tmp_path):
    result_path = tmp_path / "probe.json"
    args = [
        str(checkpoint),
        "--image-size",
        "16",
        "--epochs",
        "10",
        "--schedule",
        "6",
        "8",
        "--lr",
        "1.0",
        "--train-samples",
        "2000",
        "--json",
        str(result_path),
    ]
    assert lincls.main(args) == 0
    assert json.loads(result_path.read_text())["top1"] > 50.0  # 10 classes: chance is 10%


def test_linear_probe_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"nope")
    assert lincls.main([str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_knn_matches_a_brute_force_vote():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(300, 8), dim=1)
    bank_labels = torch.randint(0, 4, (300,))
    queries = F.normalize(torch.randn(50, 8), dim=1)
    labels = torch.randint(0, 4, (50,))
    k, t = 20, 0.1
    correct = 0
    for q, y in zip(queries, labels):
        sims = bank @ q
        order = sorted(range(300), key=lambda i: -float(sims[i]))[:k]
        votes = [0.0] * 4
        for i in order:
            votes[int(bank_labels[i])] += float(torch.exp(sims[i] / t))
        correct += int(max(range(4), key=lambda c: votes[c]) == int(y))
    assert knn_top1(bank, bank_labels, queries, labels, k=k, t=t, chunk=16) == pytest.approx(100.0 * correct / 50)

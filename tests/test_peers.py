"""The peers suite: our step beside the official-style step and lightly's recipe, and the peers compute MoCo."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.__main__ import main
from benchmarks.core import official_moco
from model import MoCo, build_encoder


def test_peers_suite_times_every_side_interleaved_and_prints_ratios(tmp_path, capsys):
    out = tmp_path / "peers.json"
    assert (
        main(
            [
                "peers",
                "--arch",
                "resnet_mini_cifar",
                "--batch-size",
                "8",
                "--image-size",
                "16",
                "--moco-k",
                "64",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--repeats",
                "2",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    sides = {r["backend"]: r for r in doc["results"]}
    assert list(sides) == ["ours", "ours --shuffle none", "official", "lightly"]
    assert all(r["images_per_s"] > 0 and len(r["images_per_s_per_repeat"]) == 2 for r in sides.values())
    for ours in ("ours", "ours --shuffle none"):
        for peer in ("official", "lightly"):
            ratio = sides[ours]["images_per_s"] / sides[peer]["images_per_s"]
            assert sides[ours]["ratios"][f"vs {peer}"] == pytest.approx(ratio)
    assert doc["versions"]["lightly"]
    assert f"{sides['ours']['ratios']['vs official']:.2f}x" in capsys.readouterr().out


def test_the_official_style_step_computes_what_our_moco_computes():
    """Same weights, queue and images: the official builder's logits equal ours (no shuffle), and its queue and
    key encoder move as ours do, so the peers benchmark times the same algorithm."""
    torch.manual_seed(0)
    ours = MoCo(
        functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=32, m=0.9, T=0.2, mlp=True, shuffle="none"
    )
    official = official_moco.MoCo(
        functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=32, m=0.9, T=0.2, mlp=True
    )
    official.load_state_dict(ours.state_dict())
    x_q, x_k = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    logits, labels = ours(x_q, x_k)
    logits_official, labels_official = official(x_q, x_k)
    torch.testing.assert_close(logits, logits_official, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, labels_official)
    torch.testing.assert_close(ours.queue, official.queue)
    assert int(ours.queue_ptr) == int(official.queue_ptr) == 8
    for a, b in zip(ours.encoder_k.parameters(), official.encoder_k.parameters()):
        torch.testing.assert_close(a, b)


def test_lightly_memory_bank_loss_is_moco_infonce():
    """lightly's NTXentLoss with a memory bank is MoCo's InfoNCE: the positive key in column 0, the bank (as it was
    before this batch's keys went in) as negatives, over T; so the lightly side times the same loss."""
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    n, dim, K, T = 8, 16, 64, 0.2
    criterion = NTXentLoss(temperature=T, memory_bank_size=(K, dim))
    bank = criterion.memory_bank.bank.clone()
    negatives = bank.transpose(0, -1) if criterion.memory_bank.feature_dim_first else bank
    if negatives.shape[0] != dim:
        negatives = negatives.T
    q, k = torch.randn(n, dim, requires_grad=True), torch.randn(n, dim)
    loss = criterion(q, k)
    qn, kn = F.normalize(q.detach(), dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ negatives], dim=1) / T
    torch.testing.assert_close(
        loss.detach(), F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)), rtol=1e-5, atol=1e-5
    )
    assert not torch.equal(criterion.memory_bank.bank, bank)  # and then the keys were enqueued

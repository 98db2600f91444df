"""The step's variants are one set of flags for train.py and the benchmarks, and each trains: torch.compile
included, which keeps the official checkpoint layout and reads nothing back on the host."""

import dataclasses
import json

import pytest

import train
from benchmarks.__main__ import main as benchmark_main
from benchmarks.core.diagnostics import HostReads
from benchmarks.core.options import parse as parse_benchmark
from engine.cli import parse_config
from engine.config import OptimConfig, StepConfig
from engine.trainer import Trainer
from model.checkpoint import load_checkpoint

VARIANT_FLAGS = [("--" + f.name.replace("_", "-"), f.name) for f in dataclasses.fields(StepConfig)] + [
    ("--fused-sgd", "fused_sgd")
]


@pytest.mark.parametrize("flag, field", VARIANT_FLAGS)
def test_every_variant_flag_means_the_same_in_train_py_and_the_benchmarks(flag, field):
    section = "optim" if field in {f.name for f in dataclasses.fields(OptimConfig)} else "step"
    kind = type(getattr(getattr(parse_config([]), section), field))
    cases = [([flag], True), (["--no-" + flag[2:]], False)] if kind is bool else [([flag, "fp16"], "fp16")]
    for argv, expected in cases:
        _, bench_cfg = parse_benchmark(["step", *argv])
        assert getattr(getattr(parse_config(argv), section), field) == expected
        assert getattr(getattr(bench_cfg, section), field) == expected


def test_a_compiled_run_trains_reads_nothing_back_and_resumes_uncompiled(small_fashion, tmp_path):
    args = [
        "--data",
        small_fashion,
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--batch-size",
        "16",
        "--moco-k",
        "64",
        "--image-size",
        "16",
        "--workers",
        "0",
        "--knn-every",
        "0",
        "--compile",
    ]
    trainer = Trainer(parse_config(args))
    try:
        trainer.build()
        trainer.run()
        im_q, im_k, _ = next(iter(trainer.loader))
        with HostReads() as reads:
            trainer.train_step(im_q, im_k)
        assert reads.found == []
    finally:
        trainer.close()
    checkpoint = load_checkpoint(tmp_path / "checkpoint_last.pth.tar")
    assert not [k for k in checkpoint["state_dict"] if "_orig_mod" in k]
    plain = [a for a in args if a != "--compile"]
    assert (
        train.main(
            [
                *plain[: plain.index("--epochs")],
                "--epochs",
                "2",
                *plain[plain.index("--epochs") + 2 :],
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    assert load_checkpoint(tmp_path / "checkpoint_last.pth.tar")["epoch"] == 2


# Every variant the CPU can run; cuda_graphs and cudnn_benchmark are GPU features (tests/test_cuda_graph.py).
CPU_VARIANTS = [[], ["--shuffle", "none"], ["--precision", "bf16"], ["--precision", "fp16"]] + [
    [
        f"--no-{flag[2:]}"
        if getattr(getattr(parse_config([]), "optim" if field == "fused_sgd" else "step"), field)
        else flag
    ]
    for flag, field in VARIANT_FLAGS
    if field not in {"precision", "cuda_graphs", "cudnn_benchmark"}
]
# A split BN layer's forward copies only its running statistics (num_splits x C floats), never an activation.
RUNNING_STATS_BYTES = 8 * 2048 * 4


@pytest.mark.parametrize(
    "variant",
    [pytest.param(v, marks=pytest.mark.slow) if v == ["--compile"] else v for v in CPU_VARIANTS],
    ids=lambda v: " ".join(v) or "default",
)
def test_check_copies_counts_every_variant_and_split_bn_moves_no_activation_in_its_forward(variant, tmp_path):
    out = tmp_path / "step.json"
    assert (
        benchmark_main(
            [
                "step",
                "--arch",
                "resnet_mini_cifar",
                "--batch-size",
                "16",
                "--image-size",
                "16",
                "--moco-k",
                "64",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--repeats",
                "1",
                "--workers",
                "0",
                "--threads",
                "1",
                "--check-copies",
                *variant,
                "--json",
                str(out),
            ]
        )
        == 0
    )
    check = json.loads(out.read_text())["results"][0]["copy_check"]
    rows = check["copies"]
    assert check["mb_per_step"] == pytest.approx(sum(r["mb"] for r in rows))
    split_bn = [r for r in rows if r["where"].startswith("model/split_bn.py")]
    assert bool(split_bn) == ("none" not in variant)
    assert not [r for r in split_bn if r["layout_change"]]
    forward = [r for r in split_bn if r["stage"] != "backward"]
    assert all(r["mb"] * 2**20 / r["count"] <= RUNNING_STATS_BYTES for r in forward), forward
    # A layout conversion happens only where the step turns channels_last views into an NCHW step's input.
    layout = {r["where"].split(":")[0] for r in rows if r["layout_change"]}
    assert layout == ({"engine/step.py"} if "--no-channels-last" in variant else set())
    # The fused loss keeps no copy of the queue; the official-style logits need one (dim x K fp32).
    queue_copies = [r for r in rows if r["op"] == "clone" and r["where"].startswith("model/moco.py")]
    if "--no-fused-loss" in variant:
        assert [(r["stage"], r["mb"]) for r in queue_copies] == [("logits", 128 * 64 * 4 / 2**20)]
    else:
        assert queue_copies == []

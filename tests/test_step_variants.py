"""The step's variants are one set of flags for train.py and the benchmarks, and each trains: torch.compile
included, which keeps the official checkpoint layout and reads nothing back on the host."""

import dataclasses

import pytest

import train
from benchmarks.core.diagnostics import HostReads
from benchmarks.core.options import parse as parse_benchmark
from engine.checkpoint import load_checkpoint
from engine.config import OptimConfig, StepConfig, parse_config
from engine.trainer import Trainer

VARIANT_FLAGS = [("--" + f.name.replace("_", "-"), f.name) for f in dataclasses.fields(StepConfig)] + [
    ("--fused-sgd", "fused_sgd")]


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
    args = ["--data", small_fashion, "--out", str(tmp_path), "--epochs", "1", "--max-steps", "3", "--batch-size",
            "16", "--moco-k", "64", "--image-size", "16", "--workers", "0", "--knn-every", "0", "--compile"]
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
    assert train.main([*plain[:plain.index("--epochs")], "--epochs", "2", *plain[plain.index("--epochs") + 2:],
                       "--resume", "auto"]) == 0
    assert load_checkpoint(tmp_path / "checkpoint_last.pth.tar")["epoch"] == 2

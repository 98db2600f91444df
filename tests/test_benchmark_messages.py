"""What the benchmarks say: the profile's verdict agrees with its figures and every variant it compares is warmed
up; the ffcv-cost study's and the checkpoint suite's tables print what they measured, in words that are true."""

import dataclasses
import io
import json
import re
import types

import pytest
import torch
from rich.console import Console

from benchmarks.__main__ import main
from benchmarks.core import options, record, report, timing, workload
from benchmarks.suites import checkpoint, profile
from engine.step import MocoStep

TINY_MODEL = [
    "--arch",
    "resnet_mini_cifar",
    "--batch-size",
    "16",
    "--image-size",
    "16",
    "--moco-k",
    "64",
    "--threads",
    "1",
]


def loader_setting(images_per_s: float, workers: int = 16) -> profile.Setting:
    return profile.Setting("dali", workers, {}, images_per_s, cpu_s_per_image=0.0005)


def test_verdict_is_overhead_bound_when_end_to_end_neither_waits_nor_steps():
    # The GPU report: the loader outran the step, yet end to end reached 0.14 of it with 2.5% data wait.
    step_ips = 111.6
    result = profile.verdict(step_ips, 0.001, loader_setting(900.0), 0.14 * step_ips, 0.025, cores=16, max_workers=16)
    assert result["bound"] == "overhead", result
    assert result["elsewhere_fraction"] == pytest.approx(0.835)
    assert "end to end reaches 0.14 of the step with 2.5% data wait" in result["advice"]
    assert "end to end 16 img/s reaches 0.14 of the step with 2.5% data wait" in result["evidence"]
    assert "outside the loader and the step" in result["advice"]


@pytest.mark.parametrize(
    ("step_ips", "loader_ips", "e2e_ips", "data_wait", "bound"),
    [
        (1000.0, 300.0, 290.0, 0.70, "loader"),  # the loop waits for data most of the time: the loader is the limit
        (111.6, 900.0, 105.0, 0.02, "step"),  # end to end nearly reaches the step alone: the step is the limit
    ],
)
def test_verdict_names_the_loader_or_the_step_when_they_account_for_end_to_end(
    step_ips, loader_ips, e2e_ips, data_wait, bound
):
    result = profile.verdict(step_ips, 0.001, loader_setting(loader_ips), e2e_ips, data_wait, cores=16, max_workers=16)
    assert result["bound"] == bound, result
    assert result["data_wait_fraction"] == data_wait


def test_profile_warms_up_every_step_variant_on_its_own(monkeypatch, tmp_path):
    """Counts each variant's step calls before its first timed window, with --warmup 0 asked for."""
    built, calls, warmups = [], {}, {}
    real_call, real_moco_step, real_window = MocoStep.__call__, workload.moco_step, timing.timed_window

    def counting_call(self, *args):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return real_call(self, *args)

    def recording_moco_step(*args):
        moco, step = real_moco_step(*args)
        built.append(step)
        return moco, step

    def noting_window(*args):
        if built and len(built) - 1 not in warmups:
            warmups[len(built) - 1] = calls.get(id(built[-1]), 0)
        return real_window(*args)

    monkeypatch.setattr(MocoStep, "__call__", counting_call)
    monkeypatch.setattr(workload, "moco_step", recording_moco_step)
    monkeypatch.setattr(timing, "timed_window", noting_window)
    out = tmp_path / "profile.json"
    assert (
        main(
            [
                "profile",
                "--backend",
                "synthetic",
                "--max-workers",
                "1",
                "--precision",
                "fp32",
                *TINY_MODEL,
                "--steps",
                "1",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert [v["flags"] for v in doc["step_variants"]] == [[], ["--precision", "bf16"]]
    assert len(warmups) == 2 and all(steps > 0 for steps in warmups.values()), warmups
    assert list(warmups.values()) == [profile.MIN_WARMUP] * 2


def printed(result: record.Record) -> str:
    console = Console(file=io.StringIO(), width=250)
    report.print_record(result, console)
    return console.file.getvalue()


def test_ffcv_cost_prints_its_own_settings_not_the_model():
    pytest.importorskip("ffcv")
    from benchmarks.studies import ffcv_cost

    opts, cfg = options.parse(["--arch", "resnet_mini_cifar", "--moco-k", "1024", "--batch-size", "16"], ffcv_cost)
    runtime = types.SimpleNamespace(device=torch.device("cpu"), world_size=1)
    command = ["python", "-m", "benchmarks.studies.ffcv_cost"]
    head = record.header(opts.suite, runtime, cfg, "fp32", opts, command)
    sides = [
        ffcv_cost.Side(name, "2000 JPEGs q90, 400x350 mean, 60 MiB", [cpu_s], [500.0])
        for name, cpu_s in (("torch v2", 0.010), ("torch crop+flip", 0.006), ("ffcv 256px, 1 thread", 0.001))
    ]
    doc = record.document([dataclasses.replace(r, **head) for r in ffcv_cost.records(sides, 1, thread_counts=[1])])
    text = printed(record.from_document(doc)[2])  # as written and read back
    assert doc["suite"] == "ffcv-cost" and doc["results"][2]["fraction_of_torch_v2"] == pytest.approx(0.1)
    assert "resnet_mini_cifar" not in text and "K 1024" not in text and "batch 16" not in text
    assert "batch 64, two 224 px views per image, from 2000 JPEGs q90, 400x350 mean, 60 MiB" in text
    assert "median over 1 epoch of" in text


def test_checkpoint_table_compares_the_steps_and_counts_in_words(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["checkpoint", *TINY_MODEL, "--steps", "1", "--warmup", "0", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    (during_row,) = [line for line in text.splitlines() if "step_during_write" in line and "│" in line]
    assert "%" not in during_row and re.search(r"\d\.\d\dx step_alone", during_row), during_row
    assert "steps ran during the 1 writes" not in text
    assert re.search(r"(median of \d+ steps? run|no step ran) during 1 write\b", text), text


@pytest.mark.parametrize(
    ("steps", "writes", "note"),
    [
        (1, 1, "step_during_write: median of 1 step run during 1 write"),
        (5, 2, "step_during_write: median of 5 steps run during 2 writes"),
        (0, 1, "no step ran during 1 write: step_during_write repeats step_alone"),
    ],
)
def test_checkpoint_overlap_note_counts_in_words(steps, writes, note):
    assert checkpoint.overlap_note(steps, writes) == note

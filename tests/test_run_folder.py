"""A run folder keeps what earlier runs left: a fresh run refuses it, --resume auto goes on from the newest
checkpoint that loads, and every line says what was kept."""

import shutil

import pytest
from conftest import metrics_rows
from test_resume import error_line, quick_run, run_args, stop_at

import train
from model.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def one_epoch(small_fashion, tmp_path_factory):
    """A finished one-epoch run: checkpoint_last, checkpoint_0001, metrics.jsonl and tb/."""
    out = tmp_path_factory.mktemp("one_epoch")
    assert quick_run(small_fashion, out) == 0
    return out


def copy_of(run, tmp_path, *drop):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    for name in drop:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


@pytest.mark.parametrize(
    "drop, left",
    [
        (("checkpoint_last.pth.tar",), "checkpoint_0001.pth.tar, metrics.jsonl, tb"),
        (("checkpoint_last.pth.tar", "checkpoint_0001.pth.tar", "tb"), "metrics.jsonl"),
        (("checkpoint_last.pth.tar", "checkpoint_0001.pth.tar", "metrics.jsonl"), "tb"),
    ],
)
def test_a_fresh_run_refuses_any_file_an_earlier_run_left(small_fashion, one_epoch, tmp_path, capsys, drop, left):
    out = copy_of(one_epoch, tmp_path, *drop)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert quick_run(small_fashion, out) == 2
    assert error_line(capsys) == (
        f"error: --out {out} already holds a run ({left}); continue it with --resume auto, or choose another --out"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert len(list((out / "tb").glob("*"))) == len(list((one_epoch / "tb").glob("*"))) or "tb" in drop


def test_resume_auto_goes_on_from_the_newest_epoch_checkpoint(small_fashion, one_epoch, tmp_path, capsys):
    out = copy_of(one_epoch, tmp_path, "checkpoint_last.pth.tar")
    assert quick_run(small_fashion, out, "--epochs", "2", "--resume", "auto") == 0
    assert f"resumed from {out / 'checkpoint_0001.pth.tar'} at epoch 1" in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint_last.pth.tar")["epoch"] == 2
    assert [r["epoch"] for r in metrics_rows(out)] == [0, 1, 2]


def test_resume_auto_passes_over_a_truncated_checkpoint_last_with_a_notice(small_fashion, one_epoch, tmp_path, capsys):
    out = copy_of(one_epoch, tmp_path)
    last = out / "checkpoint_last.pth.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert quick_run(small_fashion, out, "--epochs", "2", "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert f"notice: checkpoint {last} is corrupt" in err
    assert f"; resuming from {out / 'checkpoint_0001.pth.tar'} instead" in err
    assert load_checkpoint(last)["epoch"] == 2


def test_resume_auto_refuses_when_no_checkpoint_loads(small_fashion, one_epoch, tmp_path, capsys):
    out = copy_of(one_epoch, tmp_path)
    for path in out.glob("checkpoint*.pth.tar"):
        path.write_bytes(b"\0" * 64)
    assert quick_run(small_fashion, out, "--epochs", "2", "--resume", "auto") == 2
    assert error_line(capsys).startswith(f"error: --resume auto: no checkpoint in {out} loads (")
    assert (out / "checkpoint_0001.pth.tar").read_bytes() == b"\0" * 64


def test_resume_auto_starts_afresh_where_a_run_left_no_checkpoint(small_fashion, one_epoch, tmp_path, capsys):
    """A rank that crashed before the first checkpoint is restarted by torchrun with --resume auto: it starts over."""
    out = copy_of(one_epoch, tmp_path, "checkpoint_last.pth.tar", "checkpoint_0001.pth.tar")
    assert quick_run(small_fashion, out, "--resume", "auto") == 0
    assert (
        f"notice: --resume auto: {out} holds no checkpoint, so the run starts afresh and replaces its "
        f"metrics.jsonl and tb"
    ) in capsys.readouterr().err
    assert [r["epoch"] for r in metrics_rows(out)] == [0, 1]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1


def test_resuming_with_other_settings_names_each_one(small_fashion, one_epoch, tmp_path, capsys):
    out = copy_of(one_epoch, tmp_path)
    assert quick_run(small_fashion, out, "--epochs", "2", "--image-size", "20", "--resume", "auto") == 0
    assert (
        "notice: settings that differ from the checkpoint's run: --image-size 20 (was 16), --epochs 2 (was 1)"
        in capsys.readouterr().err
    )


@pytest.fixture(scope="module")
def cut_in_epoch_1(small_fashion, tmp_path_factory):
    """A run stopped at step 5 of its first epoch."""
    out = tmp_path_factory.mktemp("cut")
    stop_at(run_args(small_fashion, out, workers=0), 0, 4)
    return out


@pytest.mark.parametrize("flag, value, was", [("--loader", "dali", "torch"), ("--seed", "1", "0")])
def test_a_cut_epoch_refuses_what_decides_its_remaining_images(
    small_fashion, cut_in_epoch_1, tmp_path, capsys, flag, value, was
):
    out = copy_of(cut_in_epoch_1, tmp_path)
    assert train.main(run_args(small_fashion, out, workers=0, extra=["--resume", "auto", flag, value])) == 2
    assert error_line(capsys) == (
        f"error: checkpoint {out / 'checkpoint_last.pth.tar'} was cut inside epoch 1, whose "
        f"remaining images follow from its {flag} {was}: resume it with the same, or from "
        f"an epoch's checkpoint"
    )


def test_a_cut_epoch_with_another_step_count_fails_before_saying_it_resumed(
    small_fashion, cut_in_epoch_1, tmp_path, capsys
):
    out = copy_of(cut_in_epoch_1, tmp_path)
    assert train.main(run_args(small_fashion, out, workers=0, extra=["--resume", "auto", "--max-steps", "50"])) == 2
    err = capsys.readouterr().err
    assert "resumed from" not in err and "was cut inside an epoch of 100 steps, but this run's epochs have 50" in err

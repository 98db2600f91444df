"""The evaluation CLIs (lincls, export) and checkpoint I/O on bad input: one line saying what is wrong."""

import errno
import io
import json
import os
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import fashion_mnist_subset
from PIL import Image

import model.checkpoint
from engine.checkpoint import CheckpointWriter
from engine.cli import parse_config
from engine.config import to_dict
from evaluation import export, lincls
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, with_prefix
from model.moco import MoCo
from model.resnet import build_encoder

ARCH = "resnet_mini_cifar"
PROBE = ["--epochs", "2", "--schedule", "1", "--batch-size", "64"]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> str:
    return fashion_mnist_subset(tmp_path_factory.mktemp("fashion"), 300, 100)


def moco_checkpoint(path: Path, train_argv: list[str] | None) -> Path:
    """What the trainer writes (a MoCo state in the official layout, `config` the trainer's config as a dict),
    without training; `train_argv` None leaves `config` out, as the official main_moco.py does."""
    moco = MoCo(lambda num_classes: build_encoder(ARCH, num_classes), dim=128, K=64, mlp=True, shuffle="none")
    state = dict(epoch=1, arch=ARCH, state_dict=with_prefix(moco.state_dict()))
    if train_argv is not None:
        state["config"] = to_dict(parse_config(["--arch", ARCH, *train_argv]))
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def trained_at_16(fashion, tmp_path_factory) -> Path:
    return moco_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "checkpoint_last.pth.tar", ["--data", fashion, "--image-size", "16"]
    )


def probe(argv: list[str], capsys, tmp_path) -> tuple[int, dict | None, list[str]]:
    """lincls.main: exit code, the result it wrote, and its stderr lines."""
    result = tmp_path / "probe.json"
    code = lincls.main([*argv, *PROBE, "--json", str(result)])
    err = capsys.readouterr().err.splitlines()
    return code, json.loads(result.read_text()) if result.exists() else None, err


# lincls probes the checkpoint's data by default.


def test_lincls_probes_the_data_and_image_size_the_checkpoint_was_trained_with(
    trained_at_16, fashion, capsys, tmp_path
):
    code, result, err = probe([str(trained_at_16)], capsys, tmp_path)
    assert code == 0 and err == []
    assert (result["data"], result["image_size"]) == (fashion, 16)
    assert 0 <= result["top1"] <= 100


def test_lincls_probes_the_kNN_data_of_a_run_trained_on_unlabelled_data(fashion, capsys, tmp_path):
    ckpt = moco_checkpoint(
        tmp_path / "c.pth.tar",
        ["--data", "train.beton", "--loader", "ffcv", "--knn-data", fashion, "--image-size", "16"],
    )
    code, result, err = probe([str(ckpt)], capsys, tmp_path)
    assert code == 0 and err == []
    assert (result["data"], result["image_size"]) == (fashion, 16)


def test_lincls_without_labelled_data_asks_for_data(tmp_path, capsys):
    ckpt = moco_checkpoint(tmp_path / "c.pth.tar", ["--data", "train.beton", "--loader", "ffcv"])
    assert lincls.main([str(ckpt)]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {ckpt} was trained on train.beton, which has no labels, "
        "and names no --knn-data; give --data\n"
    )


@pytest.mark.parametrize("other_data, image_size", [(False, 20), (True, 16), (True, 20)])
def test_lincls_states_other_data_than_the_checkpoints_in_one_notice(
    trained_at_16, fashion, tmp_path, capsys, other_data, image_size
):
    data = fashion_mnist_subset(tmp_path / "other", 200, 100) if other_data else fashion
    code, result, err = probe([str(trained_at_16), "--data", data, "--image-size", str(image_size)], capsys, tmp_path)
    assert code == 0 and (result["data"], result["image_size"]) == (data, image_size)
    assert err == [
        f"notice: probing {data} at {image_size} px; checkpoint {trained_at_16} was trained on {fashion} at 16 px"
    ]


def test_lincls_asked_for_the_checkpoints_own_data_says_nothing(trained_at_16, fashion, tmp_path, capsys):
    code, result, err = probe([str(trained_at_16), "--data", fashion, "--image-size", "16"], capsys, tmp_path)
    assert code == 0 and err == []


def test_lincls_on_a_checkpoint_without_config_falls_back_and_says_so(fashion, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lincls, "FALLBACK_DATA", fashion)  # the real fallback, fashion-mnist, is 70k images
    ckpt = moco_checkpoint(tmp_path / "official.pth.tar", None)
    code, result, err = probe([str(ckpt)], capsys, tmp_path)
    assert code == 0
    assert (result["data"], result["image_size"]) == (fashion, 28)
    assert err == [
        f"notice: checkpoint {ckpt} does not record the data it was trained on (train.py did not write "
        f"it); probing {fashion} at 28 px"
    ]


def test_lincls_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit:
        lincls.main(["--help"])
    assert exit.value.code == 0
    options = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:")[1])  # an entry per flag
    entries = {entry.split()[0]: " ".join(entry.split()) for entry in options if entry.startswith("--")}
    assert set(entries) == {
        "--data",
        "--arch",
        "--image-size",
        "--epochs",
        "--lr",
        "--schedule",
        "--batch-size",
        "--train-samples",
        "--device",
        "--seed",
        "--json",
    }
    for flag, entry in entries.items():
        assert entry.count("default") == 1, entry
    assert "(default: the checkpoint's kNN data, else its training data; fashion-mnist if" in entries["--data"]
    assert "(default: the checkpoint's; 28 if it records none)" in entries["--image-size"]
    assert "(default: 100)" in entries["--epochs"] and "(default: [60, 80])" in entries["--schedule"]


@pytest.mark.parametrize(
    "arch, state, reason",
    [
        (
            "resnet18",
            None,
            "48 weights missing (e.g. layer1.1.conv1.weight); 60 weights of another shape (e.g. conv1.weight)",
        ),
        (None, "torchvision", "it holds no query encoder weights (module.encoder_q.*)"),
    ],
)
def test_lincls_rejects_a_checkpoint_that_does_not_fit_the_encoder_in_one_line(
    trained_at_16, tmp_path, capsys, arch, state, reason
):
    ckpt = trained_at_16
    if state == "torchvision":  # an encoder's own state dict where the MoCo one belongs
        ckpt = tmp_path / "plain.pth.tar"
        torch.save(dict(epoch=1, arch=ARCH, state_dict=build_encoder(ARCH, 128).state_dict()), ckpt)
    assert lincls.main([str(ckpt), *(["--arch", arch] if arch else [])]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {ckpt} (arch {ARCH}) does not fit the {arch or ARCH} encoder: {reason}\n"
    )


# export to a path that cannot take the file.


@pytest.mark.parametrize("fmt", ["torchvision", "detectron2"])
def test_export_to_a_missing_folder_or_a_folder_is_one_line_and_writes_nothing(trained_at_16, tmp_path, capsys, fmt):
    missing = tmp_path / "missing_dir" / "x.pth"
    assert export.main([str(trained_at_16), str(missing), "--format", fmt]) == 2
    assert capsys.readouterr().err == f"error: cannot write {missing}: the folder {missing.parent} does not exist\n"
    folder = tmp_path / "existing_dir"
    folder.mkdir()
    assert export.main([str(trained_at_16), str(folder), "--format", fmt]) == 2
    assert capsys.readouterr().err == f"error: cannot write {folder}: it is a folder; name a file in it\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing_dir"]


def test_export_that_fails_while_writing_leaves_nothing_behind(trained_at_16, tmp_path, capsys):
    """The temporary file export writes first is a link to /dev/full, where every write fails with ENOSPC."""
    out = tmp_path / "encoder.pth"
    (tmp_path / "encoder.pth.tmp").symlink_to("/dev/full")
    assert export.main([str(trained_at_16), str(out)]) == 2
    assert capsys.readouterr().err == f"error: writing {out} failed: no space left on device\n"
    assert list(tmp_path.iterdir()) == []


# A file that is not a checkpoint, without torch's advice to unpickle it anyway.


def jpeg(path: Path) -> Path:
    Image.new("RGB", (8, 8)).save(path, "JPEG")
    return path


def metrics_jsonl(path: Path) -> Path:
    path.write_text('{"epoch": 0, "loss": null, "knn_top1": 69.55}\n')
    return path


def truncated_checkpoint(path: Path) -> Path:
    torch.save(dict(epoch=1, state_dict={"w": torch.zeros(1000)}), path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def foreign_objects(path: Path) -> Path:
    torch.save(dict(epoch=1, state_dict={}, ratio=Fraction(1, 3)), path)
    return path


def run_cli(cli: str, path: Path, tmp_path: Path) -> int:
    return lincls.main([str(path)]) if cli == "lincls" else export.main([str(path), str(tmp_path / "out.pth")])


@pytest.mark.parametrize("cli", ["lincls", "export"])
@pytest.mark.parametrize(
    "make, message",
    [
        (jpeg, "{} is not a checkpoint: torch.save did not write it (it is another kind of file, or corrupt)"),
        (metrics_jsonl, "{} is not a checkpoint: torch.save did not write it (it is another kind of file, or corrupt)"),
        (truncated_checkpoint, "checkpoint {} is corrupt or truncated"),
        (
            foreign_objects,
            "{} holds objects other than tensors and plain data (fractions.Fraction): it is not a "
            "checkpoint this project wrote",
        ),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_one_line_without_unsafe_advice(tmp_path, capsys, cli, make, message):
    path = make(tmp_path / "input")
    assert run_cli(cli, path, tmp_path) == 2
    assert capsys.readouterr().err == f"error: {message.format(path)}\n"
    assert not (tmp_path / "out.pth").exists()


def test_a_folder_given_as_checkpoint_says_so(tmp_path, capsys):
    assert lincls.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path} is a folder, not a checkpoint file\n"


def test_lincls_refuses_a_json_path_it_cannot_write_before_probing(trained_at_16, tmp_path, capsys):
    bad = tmp_path / "missing_dir" / "probe.json"
    assert lincls.main([str(trained_at_16), *PROBE, "--json", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {bad}: the folder {bad.parent} does not exist\n"


# A full disk, named as such, with the path.

STATE = dict(epoch=1, state_dict={"w": torch.arange(100_000.0)})


def assert_previous_checkpoint_intact(path: Path) -> None:
    assert load_checkpoint(path)["epoch"] == 0 and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_checkpoint_written_to_a_full_disk_names_it_and_the_path(tmp_path):
    """The temporary file is a link to /dev/full: the kernel's ENOSPC, through torch.save's real write path."""
    last = tmp_path / "checkpoint_last.pth.tar"
    save_checkpoint(dict(STATE, epoch=0), last)
    (tmp_path / "checkpoint_last.pth.tar.tmp").symlink_to("/dev/full")
    writer = CheckpointWriter()
    writer.submit(STATE, last)
    with pytest.raises(CheckpointError) as error:
        writer.wait()
    assert str(error.value) == f"writing {last} failed: no space left on device"
    assert_previous_checkpoint_intact(last)
    assert Path("/dev/full").is_char_device()


class FillsUp(io.FileIO):
    """A file on a disk that has room for 4 kB."""

    def write(self, data) -> int:
        if self.tell() + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_torchs_unexpected_pos_error_is_read_as_a_full_disk(tmp_path, monkeypatch):
    """torch turns the failed write into '[enforce fail at inline_container.cc] . unexpected pos N vs M', the
    message the issue saw; the OSError behind it says what happened."""
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save(STATE, FillsUp(tmp_path / "probe", "wb"))
    (tmp_path / "probe").unlink()
    last = tmp_path / "checkpoint_last.pth.tar"
    save_checkpoint(dict(STATE, epoch=0), last)
    monkeypatch.setattr(model.checkpoint, "open", FillsUp, raising=False)
    writer = CheckpointWriter()
    writer.submit(STATE, last, tmp_path / "checkpoint_0001.pth.tar")
    with pytest.raises(CheckpointError) as error:
        writer.wait()
    assert str(error.value) == f"writing {last} failed: no space left on device"
    assert_previous_checkpoint_intact(last)

"""train.py end to end on tiny Fashion-MNIST runs: metrics, checkpoints, exact resume, and bad input."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import metrics_rows

import train
from engine.cli import build_parser, choices, parse_config, validate
from engine.config import ConfigError, to_dict
from model.checkpoint import load_checkpoint, query_encoder_state

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--epochs",
    "2",
    "--max-steps",
    "3",
    "--batch-size",
    "32",
    "--moco-k",
    "128",
    "--image-size",
    "16",
    "--workers",
    "0",
    "--knn-train-samples",
    "200",
    "--knn-val-samples",
    "100",
    "--print-freq",
    "1",
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


def test_metrics_rows_and_official_checkpoint_layout(full_run):
    metrics = metrics_rows(full_run)
    assert [r["epoch"] for r in metrics] == [0, 1, 2]
    assert metrics[0]["loss"] is None and 0 <= metrics[0]["knn_top1"] <= 100
    for r in metrics[1:]:
        assert {"epoch", "loss", "knn_top1", "img_per_s", "lr"} <= set(r) and r["img_per_s"] > 0 and r["loss"] > 0
    ckpt = torch.load(full_run / "checkpoint_0002.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet_mini_cifar" and "optimizer" in ckpt
    keys = ckpt["state_dict"].keys()
    assert "module.encoder_q.conv1.weight" in keys and "module.queue" in keys and "module.queue_ptr" in keys
    assert not list(full_run.glob("*.tmp"))


def test_checkpoint_loads_like_official_main_lincls(full_run):
    """The loading code of the official main_lincls.py, applied to our checkpoint."""
    from model.resnet import build_encoder

    state_dict = torch.load(full_run / "checkpoint_last.pth.tar", map_location="cpu")["state_dict"]
    for k in list(state_dict.keys()):
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            state_dict[k[len("module.encoder_q.") :]] = state_dict[k]
        del state_dict[k]
    model = build_encoder("resnet_mini_cifar", num_classes=10)
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    assert (
        query_encoder_state(torch.load(full_run / "checkpoint_last.pth.tar")["state_dict"]).keys() == state_dict.keys()
    )


def test_resumed_run_matches_uninterrupted_run(full_run, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "metrics.jsonl").write_text((full_run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    shutil.copyfile(full_run / "checkpoint_0001.pth.tar", resumed / "checkpoint_0001.pth.tar")
    args = TINY + ["--out", str(resumed), "--resume", str(resumed / "checkpoint_0001.pth.tar")]
    assert train.main(args) == 0
    a = load_checkpoint(full_run / "checkpoint_0002.pth.tar")
    b = load_checkpoint(resumed / "checkpoint_0002.pth.tar")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    assert metrics_rows(resumed)[-1]["loss"] == pytest.approx(metrics_rows(full_run)[-1]["loss"], rel=1e-6)
    assert [r["epoch"] for r in metrics_rows(resumed)] == [0, 2]


def run_cli(args, timeout=120):
    """train.py in a subprocess, to its end: a run that does not end fails the test."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_data_path(tmp_path):
    assert_one_line_error(
        run_cli(TINY + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path)]), "does not exist", "nope"
    )


def test_empty_data_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(TINY + ["--data", str(empty), "--out", str(tmp_path)]), "is empty")


def image_folder(root: Path, splits=("train",), images=40) -> Path:
    from PIL import Image

    for split in splits:
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(images // 2):
                Image.new("RGB", (20, 20), (i * 6, c * 100, 0)).save(root / split / f"c{c}" / f"ok{i}.jpg")
    return root


def test_unreadable_image(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "train" / "c0" / "broken.jpg").write_bytes(b"this is not a jpeg")
    assert_one_line_error(
        run_cli(TINY + ["--data", str(root), "--out", str(tmp_path / "o")]), "unreadable image", "broken.jpg"
    )


def truncated_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "JPEG")
    return buffer.getvalue()[:200]  # a valid header: only decoding finds the damage


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_image_that_fails_in_a_worker_ends_the_run_in_one_line(tmp_path, split):
    """A truncated JPEG passes the header check and fails in a DataLoader worker (training, or the kNN monitor's
    val split); the run says which file in one line and exits, workers and all."""
    root = image_folder(tmp_path / "images", ("train", "val"))
    (root / split / "c1" / "truncated.jpg").write_bytes(truncated_jpeg())
    args = TINY + [
        "--data",
        str(root),
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "2",
        "--batch-size",
        "8",
        "--moco-k",
        "64",
        "--bn-splits",
        "2",
        "--max-steps",
        "100",
    ]
    result = run_cli(args)
    assert_one_line_error(result, "unreadable image", "truncated.jpg")
    assert result.stderr.startswith("error: unreadable image ")  # not "error: pipeline.errors.DataError: ..."


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--print-freq", "0"], "--print-freq must be at least 1"),
        (["--save-every", "0"], "--save-every must be at least 1"),
        (["--max-steps", "-1"], "--max-steps must be at least 1"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--checkpoint-minutes", "-1"], "--checkpoint-minutes must not be negative"),
        (["--checkpoint-steps", "-2"], "--checkpoint-steps must not be negative"),
        (["--lr", "-0.1"], "--lr must be positive"),
        (["--workers", "-1"], "--workers must not be negative"),
        (["--bn-splits", "0"], "--bn-splits must be at least 1"),
        (["--moco-t", "0"], "--moco-t must be positive"),
        (["--moco-m", "1.5"], "--moco-m must be in [0, 1]"),
        (["--cuda-graphs", "--optimizer", "lars"], "--cuda-graphs"),
        (["--shuffle", "ddp"], "needs several processes"),
        (["--precision", "fp8"], "unknown --precision 'fp8'; choose one of: auto, bf16, fp16, fp32"),
        (["--preset", "imagenet", "--batch-size", "8", "--moco-k", "64"], "gives each BN sub-batch 1 sample"),
        (["--batch-size", "1", "--shuffle", "none", "--moco-k", "64"], "gives each BN sub-batch 1 sample"),
    ],
)
def test_a_setting_that_cannot_work_fails_before_any_data_is_read(tmp_path, capsys, flags, fragment):
    """The data path does not exist: a data error would mean the data was looked at before the setting."""
    status = train.main(TINY + ["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "o"), *flags])
    assert_one_line_error(subprocess.CompletedProcess([], status, "", capsys.readouterr().err), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_cuda_device_without_one(tmp_path):
    assert_one_line_error(run_cli(TINY + ["--device", "cuda", "--out", str(tmp_path)]), "no CUDA device")


def test_out_that_cannot_be_a_folder(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert_one_line_error(run_cli(TINY + ["--out", str(a_file)]), "is a file")
    assert_one_line_error(run_cli(TINY + ["--out", str(a_file / "below")]), "cannot be written", "Not a directory")


def test_k_not_divisible_by_global_batch(tmp_path):
    assert_one_line_error(run_cli(TINY + ["--moco-k", "100", "--out", str(tmp_path)]), "--moco-k 100", "32")


def test_unknown_loader_and_arch(tmp_path):
    assert_one_line_error(run_cli(TINY + ["--loader", "tfrecord", "--out", str(tmp_path)]), "--loader", "tfrecord")
    assert_one_line_error(run_cli(TINY + ["--arch", "vgg11", "--out", str(tmp_path)]), "--arch", "vgg11")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal; test_cuda_graph covers the GPU")
def test_cuda_graphs_without_a_gpu(tmp_path):
    assert_one_line_error(run_cli(TINY + ["--cuda-graphs", "--out", str(tmp_path)]), "--cuda-graphs", "CUDA device")


def test_sigterm_says_which_checkpoint_to_resume_from(tmp_path):
    """SIGTERM to the whole process group (as a scheduler sends it; DataLoader workers included) right after an
    epoch's line: that epoch's checkpoint is still written, then one line says so."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *TINY, "--workers", "1", "--epochs", "50", "--out", str(tmp_path)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("epoch 1:"):  # the end of epoch 1: its checkpoint is written
            os.killpg(process.pid, signal.SIGTERM)
            break
    rest = process.communicate(timeout=120)[1].strip().splitlines()
    assert process.returncode == 130, "".join(lines) + "\n".join(rest)
    last = tmp_path / "checkpoint_last.pth.tar"
    epoch = load_checkpoint(str(last))["epoch"]
    assert epoch >= 1 and rest[-1] == f"interrupted: {last} holds epoch {epoch}; continue with --resume {last}"
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.pth.tar"
    bad.write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_cli(TINY + ["--resume", str(bad), "--out", str(tmp_path)]), "corrupt", str(bad))


def test_batch_not_divisible_by_world_size():
    with pytest.raises(ConfigError, match="--batch-size 33 is not divisible by the world size 2"):
        validate(parse_config(["--batch-size", "33", "--moco-k", "33"]), world_size=2)


def test_help_documents_every_flag():
    text = run_cli(["--help"]).stdout
    for flag in [
        "--data",
        "--loader",
        "--arch",
        "--moco-k",
        "--moco-m",
        "--moco-t",
        "--mlp",
        "--shuffle",
        "--batch-size",
        "--lr",
        "--schedule",
        "--precision",
        "--resume",
        "--out",
        "--knn-k",
        "--preset",
    ]:
        assert flag in text


def test_help_states_each_default_once_and_truly():
    """Every flag's help says its default exactly once, and what it says is what an unset flag gets."""
    parser = build_parser()
    formatter = parser.formatter_class(prog="train.py")
    cfg = to_dict(parse_config([]))
    values = {name: value for section in cfg.values() for name, value in section.items()}
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._get_help_string(action) % {"default": action.default}
        assert text.count("(default:") == 1, text
        if action.dest in choices():  # the choices named once: by the help, or by the registry's list
            named = text.split(" (one of: ")[0]
            assert all(c in named for c in choices()[action.dest]) != (" (one of: " in text), text
        if action.dest in values and values[action.dest] is not None:
            assert f"(default: {action.default})" in text and action.default == values[action.dest], text
    assert "all if unset" not in run_cli(["--help"]).stdout


def test_default_command_smoke(tmp_path):
    """`python train.py` with its defaults, cut to a few steps: the README's main command works."""
    result = run_cli(
        [
            "--epochs",
            "1",
            "--max-steps",
            "3",
            "--knn-train-samples",
            "500",
            "--knn-val-samples",
            "200",
            "--out",
            str(tmp_path),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "kNN top-1" in result.stderr and "resnet_mini_cifar" in result.stderr
    metrics = metrics_rows(tmp_path)
    assert [r["epoch"] for r in metrics] == [0, 1] and metrics[1]["knn_top1"] is not None


def test_imagenet_preset_is_the_moco_v2_paper_recipe():
    cfg = parse_config(["--preset", "imagenet", "--data", "/imagenet"])
    assert (
        cfg.model.arch,
        cfg.model.moco_dim,
        cfg.model.moco_k,
        cfg.model.moco_m,
        cfg.model.moco_t,
        cfg.model.mlp,
    ) == ("resnet50", 128, 65536, 0.999, 0.2, True)
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.momentum, cfg.optim.wd, cfg.optim.schedule) == (
        0.03,
        256,
        0.9,
        1e-4,
        "cos",
    )
    assert (cfg.run.epochs, cfg.data.aug, cfg.data.image_size, cfg.model.bn_splits) == (200, "v2", 224, 8)
    assert parse_config(["--preset", "imagenet", "--moco-k", "4096"]).model.moco_k == 4096  # flags win


def test_train_under_torchrun_with_two_gloo_processes(tmp_path):
    args = [
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "train.py"),
        *TINY,
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpu x2" in result.stderr and result.stderr.count("steps/epoch") == 1  # rank 0 reports, once
    metrics = metrics_rows(tmp_path)
    assert [r["epoch"] for r in metrics] == [0, 1] and metrics[1]["loss"] > 0
    ckpt = load_checkpoint(tmp_path / "checkpoint_last.pth.tar")
    assert ckpt["state_dict"]["module.queue_ptr"].item() == (3 * 32) % 128  # 3 steps of the global batch

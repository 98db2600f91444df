"""The benchmark suites on a tiny CPU configuration: they run, their JSON holds every promised field, the
stage times account for the step, and the chart is a real PNG."""

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.__main__ import main
from benchmarks.core import record
from benchmarks.tools.imagenet_like import generate

# One thread: on a shared 2-core machine it is the steadiest setting (see --threads).
TINY = [
    "--arch",
    "resnet_mini_cifar",
    "--batch-size",
    "16",
    "--image-size",
    "16",
    "--moco-k",
    "64",
    "--steps",
    "4",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--workers",
    "0",
    "--threads",
    "1",
]
# The fused loss (the default) computes the logits inside its "loss" stage, before the queue update.
STEP_STAGES = [
    "query_forward",
    "momentum_update",
    "shuffle",
    "key_forward",
    "unshuffle",
    "loss",
    "queue_update",
    "backward",
    "optimizer",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main([*args, *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def assert_valid_png(path: Path) -> None:
    assert path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.width > 100 and img.height > 100


def assert_required_fields(doc: dict, suite: str) -> None:
    assert doc["suite"] == suite and doc["device"]
    assert {"python", "torch", "torchvision"} <= set(doc["versions"])
    assert doc["config"]["arch"] == "resnet_mini_cifar" and doc["config"]["batch_size"] == 16
    assert doc["command"][:3] == ["python", "-m", "benchmarks"] and suite in doc["command"]
    for result in [doc, *doc["results"]]:
        assert result["backend"] and result["images_per_s"] > 0 and result["cpu_s_per_image"] >= 0
        assert result["stages"] and all(ms >= 0 for ms in result["stages"].values())
        assert result["peak_host_rss_mb"] > 0 and result["peak_device_mb"] is None  # CPU: no device memory


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step")
    doc = run(tmp, "step", "step", "--trace", str(tmp / "trace"), "--check-syncs", "--png", str(tmp / "step.png"))
    return doc, tmp


def test_step_suite_reports_every_stage(step_run):
    doc, tmp = step_run
    assert_required_fields(doc, "step")
    assert doc["backend"] == "synthetic" and list(doc["stages"]) == STEP_STAGES
    assert doc["cpu_s_per_image"] > 0
    assert doc["totals"]["step_ms"] > 0
    assert doc["sync_check"]["status"] == "passed"  # on the CPU: no op that would sync on a GPU
    assert_valid_png(tmp / "step.png")


def test_stage_times_add_up_to_the_instrumented_step(step_run):
    totals = step_run[0]["totals"]
    assert totals["stage_sum_ms"] == pytest.approx(sum(step_run[0]["stages"].values()))
    assert totals["stage_sum_ms"] == pytest.approx(totals["step_ms_instrumented"], rel=0.10)


def test_trace_names_the_stages(step_run):
    doc, _ = step_run
    (trace,) = doc["traces"]
    names = {event.get("name") for event in json.loads(Path(trace).read_text())["traceEvents"]}
    assert {"query_forward", "backward", "optimizer"} <= names


def test_loader_suite_measures_several_backends(tmp_path):
    doc = run(
        tmp_path,
        "loader",
        "loader",
        "--backend",
        "synthetic",
        "torch",
        "--data",
        "fashion-mnist",
        "--png",
        str(tmp_path / "loaders.png"),
    )
    assert_required_fields(doc, "loader")
    assert [r["backend"] for r in doc["results"]] == ["synthetic", "torch"]
    assert doc["results"][1]["cpu_s_per_image"] > 0  # decoding and augmenting cost host CPU
    assert all(r["stages"]["next_batch"] > 0 for r in doc["results"])
    assert_valid_png(tmp_path / "loaders.png")


def test_e2e_suite_splits_waiting_from_stepping(tmp_path):
    doc = run(tmp_path, "e2e", "e2e", "--backend", "torch", "--data", "fashion-mnist")
    assert_required_fields(doc, "e2e")
    totals = doc["totals"]
    assert 0 <= totals["data_wait_ms"] < totals["e2e_step_ms"]
    assert sum(doc["stages"].values()) == pytest.approx(totals["e2e_step_ms"])


def test_stages_suite_lines_up_loader_step_and_end_to_end(tmp_path):
    jpegs = generate(tmp_path / "jpegs", images=32, classes=2, show_progress=False)
    doc = run(tmp_path, "stages", "stages", "--backend", "torch", "--data", str(jpegs), "--sample-images", "4")
    assert_required_fields(doc, "stages")
    loader = ["read_decode", "augment", "collate", "h2d", "next_batch"]
    assert list(doc["stages"]) == loader + STEP_STAGES + ["data_wait", "step_and_loop"]
    assert {"loader_batch_ms", "step_ms", "step_ms_instrumented", "stage_sum_ms", "e2e_step_ms"} <= set(doc["totals"])
    assert doc["loader_images_per_s"] > 0 and doc["step_images_per_s"] > 0


def test_chart_from_several_result_files(step_run, tmp_path):
    doc, tmp = step_run
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "results": [{**doc["results"][0], "images_per_s": 1.0}]}))
    assert main(["chart", str(tmp / "step.json"), str(other), "--png", str(tmp_path / "compare.png")]) == 0
    assert_valid_png(tmp_path / "compare.png")


def test_an_impossible_configuration_is_one_line_error(tmp_path, capsys):
    assert main(["step", *TINY, "--moco-k", "60"]) == 2
    assert "is not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--png"])
def test_an_unwritable_output_fails_before_measuring(tmp_path, capsys, flag):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["step", *TINY, flag, str(a_file / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {flag} {a_file / 'out'} cannot be written: {a_file} is a file"


def test_checkpoint_suite_measures_the_save(tmp_path):
    doc = run(tmp_path, "checkpoint", "checkpoint")
    assert_required_fields(doc, "checkpoint")
    stages = doc["stages"]
    assert doc["checkpoint_mb"] > 0 and stages["background_write"] > 0 and 0 < stages["loop_pause"]
    assert stages["step_alone"] > 0


PROFILE = [
    "--backend",
    "torch",
    "--max-workers",
    "1",
    "--precision",
    "bf16",
    "--batch-size",
    "16",
    "--image-size",
    "16",
    "--moco-k",
    "64",
    "--steps",
    "3",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> Path:
    """ImageNet-sized JPEGs: decoding them costs far more than a step of the tiny model at 16 px."""
    return generate(tmp_path_factory.mktemp("large_jpegs"), 64, classes=2, seed=0)


def assert_profile(doc: dict, bound: str) -> None:
    from engine.cli import parse_config, validate

    assert doc["suite"] == "profile" and doc["verdict"]["bound"] == bound, doc["verdict"]
    assert {"evidence", "advice", "e2e_over_step", "cores_needed", "cores"} <= set(doc["verdict"])
    assert doc["step_images_per_s"] > 0 and doc["loader_images_per_s"] > 0 and doc["images_per_s"] > 0
    assert [s["workers"] for s in doc["sweep"]] == [1] and doc["sweep"][0]["backend"] == "torch"
    command = doc["recommended_command"]
    assert command[:2] == ["python", "train.py"] and "--loader" in command and "--workers" in command
    validate(parse_config(command[2:]), 1)  # train.py's own flags, a setting that can work


def profile(tmp_path: Path, *args: str) -> dict:
    assert main(["profile", *PROFILE, *args, "--json", str(tmp_path / "profile.json")]) == 0
    return json.loads((tmp_path / "profile.json").read_text())


def test_profile_says_loader_bound_behind_jpeg_decoding(large_jpegs, tmp_path):
    # fp32 asked for: bf16 is measured too, and the command must replace the flag, not add a second value
    doc = profile(
        tmp_path,
        "--data",
        str(large_jpegs),
        "--cores",
        "64",
        "--precision",
        "fp32",
        "--png",
        str(tmp_path / "profile.png"),
    )
    assert [v["flags"] for v in doc["step_variants"]] == [[], ["--precision", "bf16"]]
    assert_profile(doc, "loader")
    assert doc["loader_images_per_s"] < doc["step_images_per_s"] and doc["verdict"]["cores_needed"] < 64
    assert_valid_png(tmp_path / "profile.png")


def test_profile_says_step_bound_under_a_heavy_model(tmp_path):
    doc = profile(tmp_path, "--arch", "resnet18_cifar", "--bn-splits", "2")
    assert_profile(doc, "step")
    assert doc["loader_images_per_s"] > doc["step_images_per_s"]


def test_chart_reads_every_committed_result(tmp_path):
    assert main(["chart", str(RESULTS), "--png", str(tmp_path / "all.png")]) == 0
    assert_valid_png(tmp_path / "all.png")


def test_every_committed_result_reads_into_records_and_back():
    """A Record holds every field of every committed result, a suite's own included: rewriting one loses nothing
    (the oldest lack only `stages`, which a Record always writes)."""
    for path in sorted(RESULTS.rglob("*.json")):
        doc = json.loads(path.read_text())
        for result, read in zip(doc["results"], record.from_document(doc), strict=True):
            assert read.to_json() == {"stages": {}, **result}, path


def test_design_studies_are_no_suites_and_take_a_suites_flags():
    from benchmarks.core import options
    from benchmarks.studies import augment
    from benchmarks.suites import SUITES

    assert not {"augment", "ffcv-cost"} & set(SUITES)
    opts, cfg = options.parse(["--batch-size", "8", "--repeats", "2"], augment)
    assert opts.suite == "augment" and opts.repeats == 2 and cfg.optim.batch_size == 8

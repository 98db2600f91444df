"""Recipes under configs/: each is the paper's (or the CPU default), a base recipe is read under its own, flags
win over them, and a recipe that names what no config holds is one line."""

import pytest

import train
from engine.cli import RECIPES, parse_config, recipe_names, validate
from engine.config import TrainConfig, to_dict


def flat(cfg) -> dict:
    return {name: value for section in to_dict(cfg).values() for name, value in section.items()}


def test_every_recipe_in_configs_is_a_valid_run():
    assert recipe_names() == ["fashion-cpu", "imagenet", "imagenet-v1", "imagenet-v2-800ep"]
    for name in recipe_names():
        validate(parse_config(["--config", name, "--data", "/imagenet"]), world_size=8)


def test_the_cpu_default_recipe_is_the_configs_own_defaults():
    assert parse_config([]) == parse_config(["--config", "fashion-cpu"]) == TrainConfig()


def test_moco_v1_and_the_800_epoch_v2_differ_from_v2_where_the_papers_do():
    v2 = flat(parse_config(["--config", "imagenet"]))
    v1 = flat(parse_config(["--config", "imagenet-v1"]))
    long = flat(parse_config(["--config", str(RECIPES / "imagenet-v2-800ep.toml")]))
    assert {k: (v2[k], v) for k, v in v1.items() if v2[k] != v} == {
        "aug": ("v2", "v1"),
        "moco_t": (0.2, 0.07),
        "mlp": (True, False),
        "schedule": ("cos", "step"),
    }
    assert v1["lr_steps"] == (120, 160) and v1["epochs"] == 200
    assert {k: (v2[k], v) for k, v in long.items() if v2[k] != v} == {"epochs": (200, 800)}


def test_flags_win_over_a_recipe_file(tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('base = "%s"\n[model]\nmoco_k = 4096\n[run]\nepochs = 3\n' % (RECIPES / "imagenet.toml"))
    cfg = parse_config(["--config", str(recipe), "--epochs", "5"])
    assert (cfg.model.arch, cfg.model.moco_k, cfg.run.epochs) == ("resnet50", 4096, 5)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[model]\nmoco_kk = 1\n", "[model] has no moco_kk"),
        ("[training]\nepochs = 1\n", "'training' is no section; the sections are: data, model, optim, step, run"),
        ("[run\n", "is not valid TOML"),
    ],
)
def test_a_recipe_that_names_what_no_config_holds_is_one_line(tmp_path, capsys, text, fragment):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    assert train.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --config {recipe}") and fragment in err[0], err


def test_an_unknown_recipe_names_the_ones_there_are(capsys):
    assert train.main(["--config", "imagenet-v3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --config imagenet-v3: no such file or recipe; the recipes are: "
        "fashion-cpu, imagenet, imagenet-v1, imagenet-v2-800ep"
    )

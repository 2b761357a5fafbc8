"""Each model's default recipe (dpnet/train/recipes.py): what fills the options left out, that
anything given (flag or TOML) wins, that a run stores and resumes the settings it used, and
that `--model vgg` is the ConvNet of the VGG layout."""

import json

import h5py
import pytest

from dpnet.models import ConvNet
from dpnet.parallel import SerialComm
from dpnet.train import TrainConfig, build_model, parse_args
from dpnet.train.config import ConfigError, validate
from dpnet.train.recipes import RECIPES, default_epochs, recipe_for, with_recipe
from tests.train_helpers import TINY, cifar_dir, run_ok  # noqa: F401


@pytest.mark.parametrize("argv, expected", [
    ([], ("momentum", 0.05, 5e-4, 500, "32,32/64,64")),
    (["--bn-mode", "none"], ("adam", 1e-3, 1e-3, 500, "32,32/64,64")),
    (["--model", "convnet"], ("adam", 2e-3, 5e-4, 500, "32,32/64,64")),
    (["--model", "vgg"], ("adam", 2e-3, 5e-4, 256, "32,32/64,64/128")),
    (["--model", "resnet20", "--bn-mode", "local"], ("adam", 1e-3, 1e-3, 500, "32,32/64,64")),
], ids=["threelayer", "threelayer-no-bn", "convnet", "vgg", "resnet20"])
def test_the_options_left_out_come_from_the_models_recipe(argv, expected):
    config = with_recipe(parse_args(argv))
    assert (config.optimizer, config.lr, config.reg, config.hidden_dim, config.stages) == expected


def test_what_is_given_wins_over_the_recipe(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('reg = 0.01\nstages = "16/32"\n')
    config = with_recipe(parse_args(["--model", "vgg", "--lr", "0.1", "--optimizer", "nesterov",
                                     "--config", str(toml)]))
    assert (config.optimizer, config.lr, config.reg, config.hidden_dim, config.stages) == \
        ("nesterov", 0.1, 0.01, 256, "16/32")
    assert with_recipe(config) == config  # nothing left to fill: unchanged


def test_default_epochs_follow_the_recipe_on_real_data_only():
    assert default_epochs(TrainConfig(model="vgg"), synthetic=False) == 15
    assert default_epochs(TrainConfig(model="vgg"), synthetic=True) == 3
    assert default_epochs(TrainConfig(), synthetic=False) == 10
    assert default_epochs(TrainConfig(model="vgg", epochs=4), synthetic=False) == 4


def test_every_model_choice_has_a_recipe_and_validates():
    from dpnet.train.config import CHOICES
    for model in CHOICES["model"]:
        for bn_mode in ("none", "sync"):
            if model.startswith("resnet") and bn_mode == "none":
                continue
            recipe = recipe_for(model, bn_mode)
            validate(TrainConfig(model=model, bn_mode=bn_mode), world_size=1)
            assert recipe.lr > 0 and recipe.epochs > 0
    assert {model for model, _ in RECIPES} | {"resnet"} >= {"threelayer", "convnet", "vgg"}
    with pytest.raises(ConfigError, match="--lr must be a positive finite number"):
        validate(TrainConfig(model="vgg", lr=-1.0), world_size=1)


def test_vgg_is_the_convnet_of_the_vgg_layout():
    model = build_model(TrainConfig(model="vgg", dtype="float64"), SerialComm())
    assert isinstance(model, ConvNet)
    conv = [model.params[f"W{i}"].shape for i in range(1, 6)]
    assert conv == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert model.params["W6"].shape == (128 * 4 * 4, 256) and model.params["W7"].shape == (256, 10)


def test_a_run_stores_the_recipe_it_used_and_resumes_with_it(cifar_dir, tmp_path):
    """The checkpoint holds the settings themselves, not 'the default', so a resumed run keeps
    them even if the recipes change; the header names them."""
    args = ["--data", cifar_dir, *TINY, "--model", "vgg", "--max-steps", "1"]
    run = run_ok(args, tmp_path)
    assert "15 epochs of 5 steps" in run.lines[0] and run.lines[0].endswith("adam lr 0.002, L2 0.0005"), run
    with h5py.File(tmp_path / "dpnet_run" / "checkpoint.h5", "r") as f:
        stored = json.loads(f.attrs["config"])
    assert (stored["optimizer"], stored["lr"], stored["reg"], stored["stages"]) == \
        ("adam", 2e-3, 5e-4, "32,32/64,64/128")
    assert stored["hidden_dim"] == 16  # TINY's --hidden-dim wins over the recipe's 256
    assert stored["epochs"] == 15  # the recipe's count, stored as used
    # what the checkpoint holds wins over today's recipe: change it there and resume
    with h5py.File(tmp_path / "dpnet_run" / "checkpoint.h5", "r+") as f:
        f.attrs["config"] = json.dumps({**stored, "lr": 0.003, "epochs": 12})
    resumed = run_ok(["--data", cifar_dir, "--no-progress", "--resume", "dpnet_run/checkpoint.h5",
                      "--max-steps", "2"], tmp_path)
    assert resumed.lines[1].endswith("12 epochs of 5 steps, global batch 32; adam lr 0.003, L2 0.0005"), resumed
    # another optimizer under --reset-optimizer gets its own rate, not the checkpoint's
    reset = run_ok(["--data", cifar_dir, "--no-progress", "--resume", "dpnet_run/checkpoint.h5",
                    "--max-steps", "3", "--optimizer", "momentum", "--reset-optimizer"], tmp_path)
    assert reset.lines[1].endswith("; momentum lr 0.05, L2 0.0005"), reset


def test_an_optimizer_other_than_the_recipes_gets_its_own_rate():
    """A recipe's rate belongs to its optimizer: --optimizer adam on ThreeLayerConvNet (whose
    recipe is SGD momentum at 0.05) runs Adam at 1e-3."""
    assert with_recipe(parse_args(["--optimizer", "adam"])).lr == 1e-3
    assert with_recipe(parse_args(["--model", "convnet", "--optimizer", "momentum"])).lr == 0.05
    assert with_recipe(parse_args(["--optimizer", "adam", "--lr", "0.01"])).lr == 0.01

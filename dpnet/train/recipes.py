"""Each model's default recipe: the settings a run takes where the flags and the TOML file leave
them out. Chosen by measurement on the CIFAR-10 subset against PyTorch with the same network
(README, "Default recipes"); settings given explicitly always win.

    with_recipe(TrainConfig(model="vgg")).lr == 2e-3
"""

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Optimizer (a --optimizer name), learning rate, L2 strength, epochs on CIFAR-10 (the
    synthetic set always gets 3), and the layout: hidden units, and ConvNet's --stages."""
    optimizer: str
    lr: float
    reg: float
    epochs: int
    hidden_dim: int = 500
    stages: str = "32,32/64,64"


VGG_LAYOUT = {"hidden_dim": 256, "stages": "32,32/64,64/128"}
ADAM = Recipe("adam", 1e-3, 1e-3, 10)  # the first defaults; still the best measured where listed

# (model, has batchnorm) -> recipe. Without batchnorm the networks are untested beyond ADAM
# (ThreeLayerConvNet: ADAM 51.1%, SGD momentum 48.5%), so they keep it.
RECIPES = {
    ("threelayer", True): Recipe("momentum", 0.05, 5e-4, 10),
    ("threelayer", False): ADAM,
    ("convnet", True): Recipe("adam", 2e-3, 5e-4, 10),
    ("convnet", False): ADAM,
    ("vgg", True): Recipe("adam", 2e-3, 5e-4, 15, **VGG_LAYOUT),
    ("vgg", False): Recipe("adam", 1e-3, 1e-3, 15, **VGG_LAYOUT),
}
# ResNet-20: 52.4%, the same as PyTorch's 52.4% (SGD momentum 0.1: 49.4%); ResNet-32: 51.9%, PyTorch 51.7%
# (PyTorch with SGD momentum 0.1 and 1 warm-up epoch: 45.8%); ResNet-44: 53.2%, PyTorch 53.4% (SGD: 43.6%);
# ResNet-56: 52.1%, PyTorch 51.8% (SGD: 45.0%); ResNet-110: 48.4%, PyTorch 50.1% (SGD + warm-up: 29.6%)
RESNET_RECIPE = ADAM
RECIPE_OPTIONS = ("optimizer", "lr", "reg", "hidden_dim", "stages")  # the TrainConfig fields a recipe fills
# the rate when --optimizer is given and is not the recipe's: a recipe's rate belongs to its
# optimizer (SGD's 0.05 would wreck Adam); 1e-3 is Adam's and RMSProp's customary rate, 0.05 the
# SGD momentum rate measured best on the batchnorm models here
OPTIMIZER_RATES = {"adam": 1e-3, "rmsprop": 1e-3, "sgd": 0.05, "momentum": 0.05, "nesterov": 0.05}


def recipe_for(model, bn_mode):
    """The Recipe of --model `model` with --bn-mode `bn_mode`; ValueError for an unknown model."""
    if model.startswith("resnet"):
        return RESNET_RECIPE
    try:
        return RECIPES[(model, bn_mode != "none")]
    except KeyError:
        raise ValueError(f"no recipe for --model {model}") from None


def with_recipe(config):
    """config with each of RECIPE_OPTIONS left unset (None) taken from its model's recipe; the
    rate of an optimizer other than the recipe's from OPTIMIZER_RATES. An unknown model is
    returned as it is, for validation to name."""
    try:
        recipe = recipe_for(config.model, config.bn_mode)
    except ValueError:
        return config
    unset = {key: getattr(recipe, key) for key in RECIPE_OPTIONS if getattr(config, key) is None}
    if config.lr is None and config.optimizer not in (None, recipe.optimizer):
        unset["lr"] = OPTIMIZER_RATES.get(config.optimizer, recipe.lr)
    return dataclasses.replace(config, **unset) if unset else config


def default_epochs(config, synthetic):
    """--epochs, else 3 on the synthetic set and the recipe's count on real data."""
    if config.epochs:
        return config.epochs
    return 3 if synthetic else recipe_for(config.model, config.bn_mode).epochs


def recipes_text():
    """The recipes as lines for --help."""
    lines = []
    for (model, bn), r in RECIPES.items():
        layout = f", --stages {r.stages} --hidden-dim {r.hidden_dim}" if model == "vgg" else ""
        lines.append(f"{model} ({'with' if bn else 'no'} batchnorm): {r.optimizer} lr {r.lr:g}, L2 {r.reg:g}, "
                     f"{r.epochs} epochs{layout}")
    r = RESNET_RECIPE
    lines.append(f"resnet*: {r.optimizer} lr {r.lr:g}, L2 {r.reg:g}, {r.epochs} epochs")
    return lines

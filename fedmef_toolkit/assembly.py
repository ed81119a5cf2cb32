"""The one way to assemble a model for training: `build_model` + `prepare_for_training`.

- `build_model(spec, num_classes, image_size)` -> `BuiltModel`: the recipe's registry model,
  or, with `model.init`, the model the file describes (a converted torchvision network, or a
  registry model written by `fedmef train`/`export`) with the file's weights. The returned
  description is what every later file of the run records (model.safetensors, checkpoints,
  memory.json), so they all describe the model that trained.
- `prepare_for_training(model, recipe, strategy=None, calibration_images=None)`: what a method
  adds before round 1: the strategy's masks (`strategy.setup`), scaled activation pruning, and
  the data-dependent NSConv gain calibration (given images). Returns (strategy, calibration).
- `dataset_shape(data_spec)`: (classes, image size) a recipe's data set implies, without
  reading it where the data set's layout fixes them (for `fedmef report RECIPE`).

Rebuilding a model from a file (converted or exported) lives in `fedmef_toolkit.architecture`;
the simulator, the memory report, `fedmef eval`/`export` and the benchmarks all come through here
or there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .architecture import (build_from_description, describe, model_from_state, read_model_file,
                           registry_description)
from .errors import UserError
from .models import model_kwargs_from_spec


@dataclass
class BuiltModel:
    model: nn.Module
    description: dict  # architecture description (registry or converted) of `model`
    init: str | None = None  # the file the initial weights came from

    @property
    def label(self) -> str:
        text = describe(self.description)
        return f"{text} from {self.init}" if self.init else text

    @property
    def from_recipe_arch(self) -> bool:
        """False when model.init's file decided the architecture (model.arch/norm/width unused)."""
        return self.init is None


def load_init_weights(model: nn.Module, state: dict, path: str) -> None:
    """Initial weights from a state dict read from `path`, checked against the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("weight_mask")]
    bad = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch for {bad[:3]}"
        raise UserError(f"model.init does not fit model '{model.__class__.__name__}': {what}", path)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def recipe_description(spec, num_classes: int, image_size: int) -> dict:
    """The registry description of a recipe's `model` section."""
    return registry_description(model_kwargs_from_spec(spec, num_classes, image_size))


def build_model(spec, num_classes: int, image_size: int, load_init: bool = True) -> BuiltModel:
    """The model a recipe's `model` section stands for (see the module docstring). A file in
    `model.init` that carries a description decides the architecture; one without gets the
    recipe's model with the file's weights."""
    desc = recipe_description(spec, num_classes, image_size)
    if not spec.init:
        return BuiltModel(build_from_description(desc), desc)
    init = str(spec.init)
    state, file_desc, _ = read_model_file(init)  # hash, schema and size checked
    if file_desc is None:
        model = build_from_description(desc)
        if load_init:
            load_init_weights(model, state, init)
        return BuiltModel(model, desc, init)
    if file_desc["kind"] == "registry" and file_desc["kwargs"].get("num_classes") != num_classes:
        raise UserError(f"model.init has {file_desc['kwargs'].get('num_classes')} outputs but the data set has "
                        f"{num_classes} classes", init)
    state = {k: v for k, v in state.items() if not k.endswith("weight_mask")}  # the method sets masks
    model = model_from_state(file_desc, state, init)
    return BuiltModel(model, file_desc, init)


def prepare_for_training(model: nn.Module, recipe, strategy=None, calibration_images: torch.Tensor | None = None):
    """Attach what the recipe's method trains with: masks (via the strategy), SAP, and the
    NSConv gain calibration when `calibration_images` are given (and the recipe asks for it).
    Returns (strategy, calibration factors or None)."""
    from .fl.strategies import build_strategy

    strategy = strategy or build_strategy(recipe)
    strategy.setup(model, recipe.seed)
    if recipe.method.sap.enabled:  # training-time only: eval mode runs the plain layers
        from .sap import enable_sap

        enable_sap(model, recipe.method.sap.gamma, recipe.method.sap.selection)
    calibration = None
    spec = recipe.model
    if calibration_images is not None and spec.norm == "nsconv" and spec.nsconv.calibrate and not spec.init:
        from .models.signal import calibrate_gains

        calibration = calibrate_gains(model, calibration_images)
    return strategy, calibration


# Classes and image size that a data set's own layout fixes (images are decoded at this size).
KNOWN_SHAPES = {"cifar10": (10, 32), "cinic10": (10, 32), "tinyimagenet": (200, 64)}


def dataset_shape(data_spec, seed: int = 0) -> tuple[int, int]:
    """(number of classes, image size) of a recipe's data set. Synthetic, CIFAR-10, CINIC-10
    and Tiny ImageNet need nothing on disk; an image folder is read (once; decoded images are
    cached) because only its files say how many classes it has."""
    if data_spec.dataset == "synthetic":
        return data_spec.synthetic.num_classes, data_spec.synthetic.image_size
    if data_spec.dataset in KNOWN_SHAPES:
        return KNOWN_SHAPES[data_spec.dataset]
    from .data import load_data

    data = load_data(data_spec, "val", seed)
    return data.num_classes, data.image_size

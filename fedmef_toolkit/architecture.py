"""Architecture descriptions: the JSON that rebuilds a model from a file.

Two kinds, stored in the metadata of every model file we write:
  {"kind": "registry", "kwargs": {"name": ..., "num_classes": ..., "norm": ..., ...}}
  {"kind": "converted", "source": {...}, "converted": [conv names], "nsconv": {...}}

This module is the one place that turns a description (or a model file) into a module:
`build_from_description`, `build_source` / `build_converted` (models written by `fedmef
convert`), `read_model_file` and `load_model_file` (any model file we write, dense or
sparse). Recipes go through `fedmef_toolkit.assembly.build_model`, which lands here too.

Files come from strangers, so a description is checked against a schema
(`validate_description`: types, allowed names, bounded sizes) and a model is
first built on the `meta` device (no memory) and compared with the tensors the
file holds (`build_for_state`) before it is built for real: a description
cannot make a reader allocate more than the file's own tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError, brief
from .models import get_model
from .models.conversion import convert_module
from .rundir import ARCH_KEY

MAX_DESCRIPTION_BYTES = 1 << 20
MAX_NUM_CLASSES = 100_000
MAX_WIDTH = 8.0  # as the recipe's model.width
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096
MAX_CONVERTED = 10_000


def registry_description(kwargs: dict) -> dict:
    return {"kind": "registry", "kwargs": dict(kwargs)}


def _bad(source: str | None, what: str):
    raise UserError(f"invalid model description: {what}", source)


def _number(value, key: str, lo: float, hi: float, integer: bool, source, lo_open: bool = False):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        _bad(source, f"{key} must be {'an integer' if integer else 'a number'}, got {type(value).__name__}")
    finite = isinstance(value, int) or math.isfinite(value)  # isfinite overflows on huge integers
    if not finite or value < lo or value > hi or (lo_open and value == lo):
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else "a huge integer"
        _bad(source, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {shown}")


def _check_kwargs(kwargs, allowed: dict, source, where: str) -> None:
    if not isinstance(kwargs, dict):
        _bad(source, f"{where} must be a mapping")
    for key, value in kwargs.items():
        if key not in allowed:
            _bad(source, f"unknown key {where}.{str(key)[:40]!r}")
        allowed[key](value, f"{where}.{key}")


class _Checks:
    """Value checkers that name the file being checked."""

    def __init__(self, source: str | None):
        self.source = source

    def choice(self, options):
        def check(value, key):
            if not isinstance(value, str) or value not in options:
                _bad(self.source, f"{key} must be one of {', '.join(options)}, got {brief(repr(value), 40)}")
        return check

    def num(self, lo, hi, integer=False, lo_open=False):
        return lambda v, key: _number(v, key, lo, hi, integer, self.source, lo_open)

    def flag(self, value, key):
        if not isinstance(value, bool):
            _bad(self.source, f"{key} must be true or false")

    def registry_kwargs(self) -> dict:
        from .models import list_models

        return {"name": self.choice(list_models()), "num_classes": self.num(1, MAX_NUM_CLASSES, True),
                "width": self.num(0.0, MAX_WIDTH, lo_open=True),
                "image_size": self.num(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, True), "norm": self.choice(("bn", "nsconv")),
                "nsconv_stats": self.choice(("active", "all")), "nsconv_unbiased": self.flag,
                "nsconv_eps": self.num(0.0, 1.0, lo_open=True), "nsconv_alpha": self.num(0.0, 1.0, lo_open=True),
                "nsconv_center_depthwise": self.flag, "nsconv_center_head": self.flag}


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def validate_description(desc, source: str | None = None) -> dict:
    """`desc` if it matches the schema of a description we write, else a one-line UserError."""
    c = _Checks(source)
    if not isinstance(desc, dict):
        _bad(source, f"expected a mapping, got {type(desc).__name__}")
    kind = desc.get("kind")
    if kind == "registry":
        if set(desc) != {"kind", "kwargs"}:
            _bad(source, "a registry description has exactly the keys kind and kwargs")
        _check_kwargs(desc["kwargs"], c.registry_kwargs(), source, "kwargs")
        if "name" not in desc["kwargs"]:
            _bad(source, "kwargs.name (the architecture) is missing")
        return desc
    if kind != "converted":
        _bad(source, f"unknown kind {brief(repr(kind), 40)} (registry or converted)")
    if not set(desc) <= {"kind", "source", "converted", "nsconv"} or "converted" not in desc:
        _bad(source, "a converted description has the keys kind, source, converted and nsconv")
    src = desc.get("source")
    if src is not None:
        if not isinstance(src, dict) or set(src) - {"source", "name", "kwargs"} or "name" not in src:
            _bad(source, "source must be a mapping with source, name and kwargs")
        if src.get("source") == "registry":
            reg = c.registry_kwargs()
            reg["name"](src["name"], "source.name")
            _check_kwargs(src.get("kwargs", {}), {k: v for k, v in reg.items() if k != "name"}, source, "source.kwargs")
        elif src.get("source") == "torchvision":
            c.choice(_torchvision_names())(src["name"], "source.name")
            _check_kwargs(src.get("kwargs", {}), {"num_classes": c.num(1, MAX_NUM_CLASSES, True)}, source,
                          "source.kwargs")
        else:
            _bad(source, f"source.source must be registry or torchvision, got {brief(repr(src.get('source')), 40)}")
    conv = desc["converted"]
    if (not isinstance(conv, list) or len(conv) > MAX_CONVERTED
            or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in conv)):
        _bad(source, f"converted must be a list of at most {MAX_CONVERTED} layer names")
    _check_kwargs(desc.get("nsconv") or {}, {"stats": c.choice(("active", "all")), "unbiased": c.flag,
                                             "eps": c.num(0.0, 1.0, lo_open=True)}, source, "nsconv")
    return desc


def build_from_description(desc: dict, source: str | None = None) -> nn.Module:
    """The model a (validated) description stands for, weights uninitialised or random."""
    validate_description(desc, source)
    try:
        if desc["kind"] == "registry":
            from .models import build_from_kwargs

            kwargs = dict(desc["kwargs"])
            # files written before the key existed trained centred depthwise filters
            if kwargs.get("norm") == "nsconv":
                kwargs.setdefault("nsconv_center_depthwise", True)
            return build_from_kwargs(kwargs)
        return build_converted(desc)
    except UserError:
        raise
    except Exception as exc:  # a schema-valid but unbuildable combination
        raise UserError(f"invalid model description: cannot build it ({brief(exc, 160)})", source) from None


def _torchvision_builder(name: str):
    import torchvision.models as tvm

    fn = getattr(tvm, name, None)
    return fn if callable(fn) and name in tvm.list_models(module=tvm) else None


def build_source(desc: dict) -> nn.Module:
    """Instantiate the (BN) source architecture a description names."""
    kind, name, kwargs = desc["source"], desc["name"], dict(desc.get("kwargs", {}))
    if kind == "registry":
        return get_model(name, **kwargs)
    if kind == "torchvision":
        builder = _torchvision_builder(name)
        if builder is None:
            raise UserError(f"unknown torchvision architecture '{name}'")
        return builder(weights=None, **kwargs)
    raise UserError(f"cannot rebuild a model of source '{kind}' (pickled modules are not rebuildable from a file)")


def build_converted(desc: dict) -> nn.Module:
    """The converted module tree (NSConv in place of conv+BN), weights uninitialised."""
    if desc.get("source") is None:
        raise UserError("this file was converted from a pickled module and cannot be rebuilt without its class")
    model = build_source(desc["source"])
    convert_module(model, desc.get("nsconv") or {}, fold=False, only=desc["converted"])
    return model


def describe(desc: dict) -> str:
    """A short human name for a description: 'resnet18/nsconv' or 'converted torchvision resnet18'."""
    if desc.get("kind") == "registry":
        kw = desc["kwargs"]
        width = f" x{kw['width']:g}" if kw.get("width", 1.0) != 1.0 else ""
        return f"{kw['name']}/{kw.get('norm', 'bn')}{width}"
    src = desc.get("source")
    return "converted pickled module" if src is None else f"converted {src['source']} {src['name']}"


def check_fits(desc: dict, shapes: dict[str, tuple], source: str | None = None,
               ignore_suffix: str = "weight_mask") -> None:
    """Refuse (one line) a description whose model's state dict differs from `shapes`, the
    tensors the file holds (names ending in `ignore_suffix` are the file's masks). The model
    is built on the meta device: this allocates nothing."""
    with torch.device("meta"):
        ghost = build_from_description(desc, source)
    own = {k: tuple(v.shape) for k, v in ghost.state_dict().items()}
    theirs = {k: tuple(v) for k, v in shapes.items() if not k.endswith(ignore_suffix)}
    missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    if missing or extra:
        what = f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}"
        raise UserError(f"tensors do not fit the described architecture: {what}", source)
    bad = [k for k in own if own[k] != theirs[k]]
    if bad:
        raise UserError(f"tensors do not fit the described architecture: {bad[0]} has shape {list(theirs[bad[0]])}, "
                        f"the architecture needs {list(own[bad[0]])}", source)


def build_for_state(desc: dict, shapes: dict[str, tuple], source: str | None = None) -> nn.Module:
    """Build the described model only if it fits `shapes` (`check_fits`): a description can
    never make us allocate more than the file's own tensors."""
    check_fits(desc, shapes, source)
    return build_from_description(desc, source)


def parse_description(text: str, source: str) -> dict:
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION_BYTES:
        raise UserError("model description in metadata is missing or too large", source)
    try:
        desc = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise UserError("corrupt model description in metadata", source) from None
    return validate_description(desc, source)


# -- model files ------------------------------------------------------------------------


def read_model_file(path) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, str]]:
    """(dense state dict, validated description or None, metadata) of a model file we wrote
    (dense or CSR-sparse; content hash checked, sparse layout validated)."""
    from .storage import read_safetensors_verified

    tensors, meta, _ = read_safetensors_verified(Path(path))
    desc = parse_description(meta[ARCH_KEY], str(path)) if ARCH_KEY in meta else None
    if meta.get("format") == "fedmef-sparse":
        from .export.sparse_format import densify

        tensors = densify(tensors, meta, str(path))
    return tensors, desc, meta


def model_from_state(desc: dict, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The described model with `state` loaded (masks attached), checked against the state's
    shapes on the meta device before anything is allocated."""
    from .sparse.masks import MASK_SUFFIX, attach_masks

    model = build_for_state(desc, {k: tuple(v.shape) for k, v in state.items()}, source)
    masks = {k[: -len("." + MASK_SUFFIX)]: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    try:
        if masks:
            attach_masks(model, masks)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"tensors do not fit the described architecture: {brief(exc)}", source) from None
    return model


def load_model_file(path) -> tuple[nn.Module, dict]:
    """(model with the file's weights and masks, description) of any model file we write."""
    state, desc, _ = read_model_file(path)
    if desc is None:
        raise UserError(f"no architecture description ({ARCH_KEY}) in the file's metadata "
                        "(not written by fedmef train/convert/export)", str(path))
    return model_from_state(desc, state, str(path)), desc

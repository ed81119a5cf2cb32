"""BN -> NSConv conversion of ordinary CNNs (`fedmef convert`).

Every Conv2d followed by a BatchNorm2d becomes an NSConv2d and the BN is
removed. The BN is folded into the NSConv's initial values: with
a = gamma / sqrt(running_var + eps) the original pair computes
a * conv(x; w) + (beta - a * running_mean) (+ a * conv bias), and an NSConv
with raw weight w computes g * conv(x; (w - mu) / ||w - mu||) + bias; so
g = a * ||w - mu|| and bias = beta - a * (running_mean - conv bias). This is
exact where a filter's mean mu is 0 and close for the usual near-zero-mean
filters. A Conv2d not followed by BN becomes an NSConv with g = ||w - mu||
and its bias kept. A BatchNorm that follows no conv cannot be folded and is
reported by name.

The output records how to rebuild the model: the source architecture
(our registry or torchvision, with its arguments) plus the list of converted
convolutions, so `load_converted` (and `fedmef train` via `model.init`)
rebuilds exactly the converted module tree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError, brief
from .architecture import ARCH_KEY, _torchvision_builder, build_converted, build_source  # noqa: F401
from .models import list_models
from .models.conversion import ConversionReport, convert_module, find_conv_bn_pairs  # noqa: F401



def _matches(desc: dict, state: dict) -> bool:
    """Whether `desc`'s model has exactly `state`'s tensors (built on the meta device: free)."""
    with torch.device("meta"):
        own = build_source(desc).state_dict()
    return set(own) == set(state) and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


def _num_classes(state: dict) -> int | None:
    linears = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(linears[-1].shape[0]) if linears else None


def resolve_arch(arch: str, state: dict, image_size: int = 32) -> dict:
    """Find a description (registry first, then torchvision) whose state dict fits `state`."""
    num_classes = _num_classes(state) or 10
    tried = []
    name = arch.split(".", 1)[1] if arch.startswith("torchvision.") else arch
    if not arch.startswith("torchvision.") and arch in list_models():
        for width in (1.0, 0.25, 0.5, 0.75, 1.5, 2.0):
            desc = {"source": "registry", "name": arch,
                    "kwargs": {"num_classes": num_classes, "width": width, "image_size": image_size, "norm": "bn"}}
            if _matches(desc, state):
                return desc
        tried.append(f"registry {arch} (widths 0.25-2)")
    if _torchvision_builder(name) is not None:
        desc = {"source": "torchvision", "name": name, "kwargs": {"num_classes": num_classes}}
        if _matches(desc, state):
            return desc
        tried.append(f"torchvision {name}")
    if not tried:
        raise UserError(f"unknown architecture '{arch}' (registry: {', '.join(list_models())}; or a torchvision name)")
    raise UserError(f"the weights do not fit {' or '.join(tried)}: keys or shapes differ")


# -- files ----------------------------------------------------------------------------


def load_input(path: Path, arch: str | None, trust_pickle: bool, image_size: int) -> tuple[nn.Module, dict | None]:
    """Return (BN model with the file's weights, source description or None for pickles)."""
    from .architecture import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size!r}")
    if not path.is_file():
        raise UserError("file not found", str(path))
    if path.suffix == ".safetensors":
        from .export.io import read_safetensors

        state, meta = read_safetensors(path)
        if arch is None and ARCH_KEY in meta:
            from .architecture import parse_description

            found = parse_description(meta[ARCH_KEY], str(path))  # schema-checked
            if found["kind"] != "registry":
                raise UserError("this file is already converted", str(path))
            desc = {"source": "registry", "name": found["kwargs"]["name"],
                    "kwargs": {k: v for k, v in found["kwargs"].items() if k != "name"}}
        elif arch is None:
            raise UserError("a safetensors state dict needs --arch NAME to know the architecture", str(path))
        else:
            desc = resolve_arch(arch, state, image_size)
        return _instantiate(desc, state, path), desc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            if not trust_pickle:
                raise UserError("contains pickled Python objects (e.g. a whole nn.Module); loading it could run "
                                "arbitrary code. Save a state_dict instead, or pass --trust-pickle if you trust "
                                "this file", str(path)) from None
        else:
            raise UserError(f"not a readable PyTorch file ({brief(exc, 160)})", str(path)) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise UserError(f"cannot unpickle ({brief(exc2, 160)})", str(path)) from None
        if not isinstance(obj, nn.Module):
            raise UserError(f"expected an nn.Module or a state dict, found {type(obj).__name__}", str(path))
        return obj, None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("expected a state dict (name -> tensor)", str(path))
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if arch is None:
        raise UserError("a state dict needs --arch NAME (a registry or torchvision architecture)", str(path))
    desc = resolve_arch(arch, state, image_size)
    return _instantiate(desc, state, path), desc


def _instantiate(desc: dict, state: dict, path: Path) -> nn.Module:
    if not _matches(desc, state):  # checked on the meta device before the model takes memory
        raise UserError(f"weights do not fit {desc['name']}: keys or shapes differ", str(path))
    model = build_source(desc)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"weights do not fit {desc['name']}: {brief(exc, 200)}", str(path)) from None
    return model


def convert_file(path: Path, out: Path, arch: str | None = None, trust_pickle: bool = False, image_size: int = 32,
                 nsconv_kwargs: dict | None = None) -> tuple[ConversionReport, dict]:
    from .storage import check_output_file, save_safetensors

    check_output_file(out)
    model, source = load_input(path, arch, trust_pickle, image_size)
    model.eval()
    original = copy.deepcopy(model)
    report = convert_module(model, nsconv_kwargs)
    output_deviation(original, model, image_size, report)
    del original
    desc = {"kind": "converted", "source": source, "converted": report.converted, "nsconv": nsconv_kwargs or {}}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "fedmef-dense", ARCH_KEY: json.dumps(desc), "converted_from": path.name}
    if report.relative_output_error is not None:
        meta["relative_output_error"] = f"{report.relative_output_error:.6g}"
    if source is None:
        meta["note"] = "converted from a pickled module: rebuild needs the original class"
    save_safetensors(out, state, meta)
    return report, desc


@torch.no_grad()
def output_deviation(original: nn.Module, converted: nn.Module, image_size: int, report: ConversionReport,
                     samples: int = 16, seed: int = 0) -> None:
    """How far the conversion moved the outputs, on `samples` seeded standard-normal inputs
    (the distribution of normalised images) in eval mode. Folding a BatchNorm into a
    standardised conv is exact only for zero-mean filters, so this is rarely 0: a converted
    model needs fine-tuning."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, image_size, image_size, generator=gen)
    try:
        before = original.eval()(x).float()
        after = converted.eval()(x).float()
    except Exception:  # a model that cannot run at this input size: leave it unmeasured
        return
    report.relative_output_error = float((after - before).norm() / before.norm().clamp_min(1e-12))
    report.max_abs_output_error = float((after - before).abs().max())
    report.sample_inputs = f"{samples} random inputs 3x{image_size}x{image_size}"


def load_converted(path: str | Path) -> nn.Module:
    """A model written by `fedmef convert`, rebuilt (`fedmef_toolkit.architecture`)."""
    from .architecture import load_model_file

    model, desc = load_model_file(path)
    if desc["kind"] != "converted":
        raise UserError("not a converted model (its description is of kind registry)", str(path))
    return model

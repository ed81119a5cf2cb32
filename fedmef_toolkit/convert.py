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

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError, brief
from .layers import NSConv2d
from .models import get_model, list_models

ARCH_KEY = "fedmef_arch"


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)  # conv names that became NSConv
    folded_bn: list[str] = field(default_factory=list)  # BN names folded and removed
    params_before: int = 0
    params_after: int = 0


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where the BN consumes the conv's output alone."""
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # models with data-dependent control flow: fall back to module order
        return _pairs_by_order(model)
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d):
            src = node.args[0] if node.args else None
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
                pairs.append((src.target, node.target))
    return pairs


def _pairs_by_order(model: nn.Module) -> list[tuple[str, str]]:
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    return [(a, b) for (a, ma), (b, mb) in zip(named, named[1:])
            if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d) and mb.num_features == ma.out_channels]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _nsconv_like(conv: nn.Conv2d, nsconv_kwargs: dict) -> NSConv2d:
    if conv.padding_mode != "zeros":
        raise UserError(f"unsupported pattern: conv '{conv}' uses padding_mode={conv.padding_mode}")
    return NSConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, **nsconv_kwargs).to(conv.weight.device)


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, new: NSConv2d) -> None:
    w = conv.weight.detach().float()
    out = w.shape[0]
    centered = w.reshape(out, -1) - w.reshape(out, -1).mean(dim=1, keepdim=True)
    norm = centered.norm(dim=1).clamp_min(1e-12)
    conv_bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(out)
    if bn is None:
        scale, shift = torch.ones(out), conv_bias
    else:
        gamma = bn.weight.detach().float() if bn.affine else torch.ones(out)
        beta = bn.bias.detach().float() if bn.affine else torch.zeros(out)
        mean = bn.running_mean.float() if bn.running_mean is not None else torch.zeros(out)
        var = bn.running_var.float() if bn.running_var is not None else torch.ones(out)
        scale = gamma / torch.sqrt(var + bn.eps)
        shift = beta - scale * (mean - conv_bias)
    new.weight.copy_(conv.weight)
    new.gain.copy_(scale * norm)
    new.bias.copy_(shift)


def convert_module(model: nn.Module, nsconv_kwargs: dict | None = None, fold: bool = True,
                   only: list[str] | None = None) -> ConversionReport:
    """Convert `model` in place. `only`: the conv names to convert (rebuilding a converted model)."""
    nsconv_kwargs = nsconv_kwargs or {}
    report = ConversionReport(params_before=sum(p.numel() for p in model.parameters()))
    modules = dict(model.named_modules())
    pairs = dict(find_conv_bn_pairs(model))
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and not isinstance(m, NSConv2d)]
    if only is not None:
        convs = [n for n in convs if n in set(only)]
    bn_used = set()
    for name in convs:
        conv = modules[name]
        bn_name = pairs.get(name)
        new = _nsconv_like(conv, nsconv_kwargs)
        if fold:
            _fold(conv, modules[bn_name] if bn_name else None, new)
        _set_module(model, name, new)
        report.converted.append(name)
        if bn_name:
            _set_module(model, bn_name, nn.Identity())
            bn_used.add(bn_name)
            report.folded_bn.append(bn_name)
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise UserError(f"unsupported pattern: BatchNorm '{leftover[0]}' does not directly follow a Conv2d, "
                        "so it cannot be folded into an NSConv")
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


# -- architectures: build the source model ----------------------------------------


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
    report = convert_module(model, nsconv_kwargs)
    desc = {"kind": "converted", "source": source, "converted": report.converted, "nsconv": nsconv_kwargs or {}}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "fedmef-dense", ARCH_KEY: json.dumps(desc), "converted_from": path.name}
    if source is None:
        meta["note"] = "converted from a pickled module: rebuild needs the original class"
    save_safetensors(out, state, meta)
    return report, desc


def build_converted(desc: dict) -> nn.Module:
    """The converted module tree (NSConv in place of conv+BN), weights uninitialised."""
    if desc.get("source") is None:
        raise UserError("this file was converted from a pickled module and cannot be rebuilt without its class")
    model = build_source(desc["source"])
    convert_module(model, desc.get("nsconv") or {}, fold=False, only=desc["converted"])
    return model


def load_converted(path: str | Path) -> nn.Module:
    from .architecture import build_for_state, parse_description
    from .export.io import read_safetensors

    state, meta = read_safetensors(path)
    if ARCH_KEY not in meta:
        raise UserError("no architecture description in the file's metadata (not written by fedmef convert)", str(path))
    desc = parse_description(meta[ARCH_KEY], str(path))
    if desc["kind"] != "converted":
        raise UserError("not a converted model (its description is of kind registry)", str(path))
    model = build_for_state(desc, {k: tuple(v.shape) for k, v in state.items()}, str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"weights do not fit the described architecture: {brief(exc, 200)}",
                        str(path)) from None
    return model

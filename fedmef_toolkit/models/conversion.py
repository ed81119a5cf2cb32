"""Module surgery of the BN -> NSConv conversion: find each Conv2d + BatchNorm2d pair and
replace it by an NSConv2d with the BN folded into its gain and bias (see
`fedmef_toolkit.convert` for the algebra). Pure functions on modules, no file I/O: the
architecture module uses them to rebuild converted models, `fedmef convert` to convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import UserError
from ..layers import NSConv2d


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)  # conv names that became NSConv
    folded_bn: list[str] = field(default_factory=list)  # BN names folded and removed
    params_before: int = 0
    params_after: int = 0
    # outputs of the converted model against the original's on sample inputs (eval mode):
    # ||after - before|| / ||before|| and the largest absolute difference (None: not measured)
    relative_output_error: float | None = None
    max_abs_output_error: float | None = None
    sample_inputs: str = ""


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

"""Signal-propagation statistics: what each residual block outputs, next to what
the normalizer-free design predicts (Brock et al. 2021 plot these to debug a
BN-free network; tests/test_signal.py bounds them)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def _eval_pass(model: nn.Module, x: torch.Tensor, hooks: dict[str, tuple[nn.Module, Callable]]) -> None:
    """One eval-mode forward over `x` with `hooks[name] = (module, fn(module, out, name))`
    as forward hooks (a hook may return a replacement output); the model is left as it was."""
    handles = [m.register_forward_hook(lambda mod, inp, out, fn=fn, name=name: fn(mod, out, name))
               for name, (m, fn) in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks that carry a predicted output variance, in forward order."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "predicted_var")}


@torch.no_grad()
def block_statistics(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Per block: mean of the channel means, mean of the channel variances (over batch
    and positions) of its output, and the predicted variance. Runs in eval mode."""
    rows = []

    def record(mod, out, name):
        o = out.detach().float()
        rows.append({"block": name, "mean": float(o.mean(dim=(0, 2, 3)).abs().mean()),
                     "var": float(o.var(dim=(0, 2, 3)).mean()), "predicted_var": float(mod.predicted_var)})

    _eval_pass(model, x, {name: (m, record) for name, m in block_modules(model).items()})
    return rows


@torch.no_grad()
def calibrate_gains(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Data-dependent gain initialisation of a BN-free model (in the spirit of LSUV).

    A zero-mean filter keeps the variance of its input only when the input is
    uncorrelated; natural images and their feature maps are smooth, so each
    3x3 NSConv passes a fraction of it (measured on CIFAR-10: a quarter at the
    stem, far less through MobileNetV2's depthwise convs), and the residual
    branches end up much weaker than alpha predicts. One forward pass over a
    batch `x` rescales every NSConv's gain, in forward order, so that its
    output (without bias) has unit variance on `x`. Returns the factor applied
    to each layer's gain. Masks must be attached first: which taps are active
    changes what a filter passes.
    """
    from ..layers import NSConv2d

    factors: dict[str, float] = {}

    def rescale(module, out, name):
        bias = 0.0 if module.bias is None else module.bias.view(1, -1, 1, 1)
        linear = out - bias
        std = linear.float().var(dim=(0, 2, 3)).mean().sqrt().clamp_min(1e-6)
        module.gain.div_(std.to(module.gain.dtype))
        factors[name] = float(1.0 / std)
        return linear / std + bias  # what the layer now computes: later layers calibrate on it

    _eval_pass(model, x, {name: (m, rescale) for name, m in model.named_modules() if isinstance(m, NSConv2d)})
    return factors

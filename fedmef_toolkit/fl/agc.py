"""Adaptive gradient clipping (AGC; Brock, De, Smith, Simonyan, ICML 2021).

Each unit (output row: an output channel of a conv, an output feature of a
linear layer) gets its gradient rescaled so that

    ||G_i|| <= clip * max(||W_i||, eps)

which bounds the relative change of every unit per step. Vectors (NSConv
gains, biases) count as one unit each, as in the NFNet authors' code, and
the final classifier is left out, as they do. Applied to the raw weights:
for NSConv layers ||G_i|| / ||W_i|| is exactly the size of the step
relative to the weight the standardisation normalises; on the gains it
stops the growth that makes a BN-free network diverge.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import use_triton
from ..layers import layout


def agc_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter but those of the last linear layer (the classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    skip = {id(p) for p in linears[-1].parameters()} if linears else set()
    return [p for p in model.parameters() if id(p) not in skip]


def _unit_norms(t: torch.Tensor) -> torch.Tensor:
    """Norm of each output row of a matrix or conv kernel; a vector is one unit."""
    if t.dim() > 1:
        return t.flatten(1).norm(dim=-1)
    return t.flatten().norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_units_(w: torch.Tensor, g: torch.Tensor, clip: float, eps: float = 1e-3) -> None:
    """Scale the gradient `g` of `w` in place so each unit's norm is at most clip * max(||w_unit||, eps).
    One fused kernel on a GPU (kernels/agc.py) where both have one layout (contiguous or
    channels-last: each unit's row is contiguous in memory)."""
    same_rows = (w.is_contiguous() and g.is_contiguous()) or (layout.is_channels_last(w) and layout.is_channels_last(g))
    if use_triton(g) and w.dim() > 1 and w.shape == g.shape and same_rows:  # each unit one row of memory, one order
        from ..kernels.agc import clip_rows_

        clip_rows_(w, g, clip, eps)
        return
    scale = (_unit_norms(w).clamp_min_(eps) * clip / _unit_norms(g).clamp_min_(1e-6)).clamp_max_(1.0)
    g.mul_(scale.view(*scale.shape, *([1] * (g.dim() - scale.dim()))).to(g.dtype))


@torch.no_grad()
def adaptive_clip_(weights: list[torch.Tensor], clip: float, eps: float = 1e-3,
                   grads: list[torch.Tensor] | None = None) -> None:
    """Rescale each weight's gradient in place, unit by unit (no host synchronisation).
    `grads`: the gradients, one per weight (default: each weight's .grad; a CUDA-graphed step
    owns its gradients instead, see stepgraph.py).

    Vectors (gains, biases: two thirds of an NSConv network's tensors) are one unit each, so
    their norms and scales take a few multi-tensor kernels for all of them at once instead of
    several kernels each: fewer launches where a step runs eagerly, fewer nodes in a step's CUDA graph."""
    if grads is None:
        grads = [w.grad for w in weights]
    vec_w, vec_g, mats = [], [], []
    for w, g in zip(weights, grads):
        if g is None:
            continue
        if w.dim() > 1:
            mats.append((w, g))
        else:
            vec_w.append(w)
            vec_g.append(g)
    if vec_w:
        w_norms = torch._foreach_norm(vec_w)
        g_norms = torch._foreach_norm(vec_g)
        torch._foreach_clamp_min_(w_norms, eps)
        torch._foreach_clamp_min_(g_norms, 1e-6)
        scales = torch._foreach_div(torch._foreach_mul(w_norms, clip), g_norms)
        torch._foreach_clamp_max_(scales, 1.0)
        torch._foreach_mul_(vec_g, scales)
    for w, g in mats:
        clip_units_(w, g, clip, eps)

"""Adaptive gradient clipping of one weight matrix, one kernel (`fl.agc.clip_units_`).

One program per unit (output row) computes ||w_i|| and ||g_i|| over the row
(fp32 sums of squares, a few blocks of a row that stays in cache) and scales
g_i in place by min(1, clip * max(||w_i||, eps) / max(||g_i||, 1e-6)). The
PyTorch version takes about eight kernels per weight (two row norms, their
clamps, the ratio, its clamp, the multiply); at federated batch sizes each
costs as much as the arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _agc_rows(w_ptr, g_ptr, fan_in, clip, eps, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * fan_in
    offs = tl.arange(0, BLOCK)
    acc_w = tl.zeros([BLOCK], tl.float32)
    acc_g = tl.zeros([BLOCK], tl.float32)
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        inb = idx < fan_in
        w = tl.load(w_ptr + base + idx, mask=inb, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + idx, mask=inb, other=0.0).to(tl.float32)
        acc_w += w * w
        acc_g += g * g
    w_norm = tl.sqrt(tl.sum(acc_w, axis=0))
    g_norm = tl.sqrt(tl.sum(acc_g, axis=0))
    # NaN passes through the clamps, as in PyTorch (a diverged row stays visibly diverged)
    w_norm = tl.where(w_norm == w_norm, tl.maximum(w_norm, eps), w_norm)
    g_norm = tl.where(g_norm == g_norm, tl.maximum(g_norm, 1e-6), g_norm)
    ratio = w_norm * clip / g_norm
    scale = tl.where(ratio == ratio, tl.minimum(ratio, 1.0), ratio)
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        inb = idx < fan_in
        g = tl.load(g_ptr + base + idx, mask=inb, other=0.0)
        tl.store(g_ptr + base + idx, (g.to(tl.float32) * scale).to(g.dtype), mask=inb)


def clip_rows_(w: torch.Tensor, g: torch.Tensor, clip: float, eps: float) -> None:
    """Scale g in place, unit by unit (w[i] and g[i]: both contiguous or both channels-last, so
    that each unit is a contiguous row of memory; the norms do not depend on its order)."""
    fan_in = w[0].numel()
    block = min(1024, triton.next_power_of_2(max(fan_in, 16)))
    _agc_rows[(w.shape[0],)](w, g, fan_in, float(clip), float(eps), BLOCK=block)

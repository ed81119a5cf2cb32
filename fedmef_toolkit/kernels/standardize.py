"""NSConv weight standardisation, forward and backward, one kernel each.

One program per output channel walks its fan-in in blocks (a few passes over
a row that stays in cache) and computes exactly what
`layers.nsconv.standardize_weight_reference` and `_Standardize.backward`
compute: mean and variance over the active (or all) entries, the eps floor,
the unbiased factor, gain and mask. Statistics are accumulated in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layers import layout


@triton.jit
def _row_mean(w_ptr, m_ptr, base, fan_in, HAS_MASK: tl.constexpr, ACTIVE: tl.constexpr, CENTER: tl.constexpr,
              BLOCK: tl.constexpr):
    """(n, mu): the count the statistics are over and the mean of w (times m) over it."""
    offs = tl.arange(0, BLOCK)
    acc_n = tl.zeros([BLOCK], tl.float32)
    acc_all = tl.zeros([BLOCK], tl.float32)
    acc_w = tl.zeros([BLOCK], tl.float32)
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        inb = idx < fan_in
        w = tl.load(w_ptr + base + idx, mask=inb, other=0.0).to(tl.float32)
        if HAS_MASK:
            m = tl.load(m_ptr + base + idx, mask=inb, other=0).to(tl.float32)
        else:
            m = inb.to(tl.float32)
        acc_n += m
        acc_all += inb.to(tl.float32)
        acc_w += w * m
    if ACTIVE:
        n = tl.sum(acc_n, axis=0)
    else:
        n = tl.sum(acc_all, axis=0)
    mu = tl.sum(acc_w, axis=0) / tl.maximum(n, 1.0)
    if not CENTER:
        mu = 0.0
    return n, mu


@triton.jit
def _centered(w_ptr, m_ptr, base, idx, inb, mu, HAS_MASK: tl.constexpr, ACTIVE: tl.constexpr):
    """c = (w - mu) * m with active statistics, w * m - mu over all entries; 0 outside the row.
    Uncentred standardisation passes mu = 0 with ACTIVE: c = w * m."""
    w = tl.load(w_ptr + base + idx, mask=inb, other=0.0).to(tl.float32)
    if HAS_MASK:
        m = tl.load(m_ptr + base + idx, mask=inb, other=0).to(tl.float32)
    else:
        m = inb.to(tl.float32)
    if ACTIVE:
        c = (w - mu) * m
    else:
        c = (w * m - mu) * inb.to(tl.float32)
    return c, m


@triton.jit
def _centered_and_grad(w_ptr, m_ptr, gy_ptr, base, idx, inb, mu, HAS_MASK: tl.constexpr, ACTIVE: tl.constexpr):
    """c and m as `_centered` gives them, and dL/dw_hat (masked where all-entry statistics
    need it; with active statistics c is already 0 where pruned)."""
    c, m = _centered(w_ptr, m_ptr, base, idx, inb, mu, HAS_MASK, ACTIVE)
    gy = tl.load(gy_ptr + base + idx, mask=inb, other=0.0).to(tl.float32)
    if HAS_MASK and not ACTIVE:
        gy = gy * m
    return c, m, gy


@triton.jit
def _row_statistics(w_ptr, m_ptr, gy_ptr, base, fan_in, HAS_GRAD: tl.constexpr, HAS_MASK: tl.constexpr,
                    ACTIVE: tl.constexpr, UNBIASED: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    """(n, mu, s, f, gc) of one row: count, mean, f * sum c^2 with the variance factor f
    (n / (n - 1) when unbiased, else 1), and sum dL/dw_hat * c (0 without HAS_GRAD)."""
    offs = tl.arange(0, BLOCK)
    n, mu = _row_mean(w_ptr, m_ptr, base, fan_in, HAS_MASK, ACTIVE, CENTER, BLOCK)
    acc_s = tl.zeros([BLOCK], tl.float32)
    acc_gc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        inb = idx < fan_in
        if HAS_GRAD:
            c, m, gy = _centered_and_grad(w_ptr, m_ptr, gy_ptr, base, idx, inb, mu, HAS_MASK, ACTIVE)
            acc_gc += gy * c
        else:
            c, m = _centered(w_ptr, m_ptr, base, idx, inb, mu, HAS_MASK, ACTIVE)
        acc_s += c * c
    f = 1.0
    if UNBIASED:
        f = n / tl.maximum(n - 1.0, 1.0)
    return n, mu, f * tl.sum(acc_s, axis=0), f, tl.sum(acc_gc, axis=0)


@triton.jit
def _standardize_fwd(w_ptr, m_ptr, g_ptr, out_ptr, fan_in, eps, HAS_MASK: tl.constexpr, ACTIVE: tl.constexpr,
                     UNBIASED: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * fan_in
    offs = tl.arange(0, BLOCK)
    n, mu, s, f, gc = _row_statistics(w_ptr, m_ptr, w_ptr, base, fan_in, False, HAS_MASK, ACTIVE, UNBIASED, CENTER,
                                      BLOCK)
    scale = tl.load(g_ptr + row).to(tl.float32) / tl.sqrt(tl.maximum(s, eps))
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        inb = idx < fan_in
        c, m = _centered(w_ptr, m_ptr, base, idx, inb, mu, HAS_MASK, ACTIVE)
        out = c * scale
        if HAS_MASK and not ACTIVE:
            out = out * m
        tl.store(out_ptr + base + idx, out, mask=inb)


@triton.jit
def _standardize_bwd(w_ptr, m_ptr, g_ptr, gy_ptr, dw_ptr, dg_ptr, fan_in, eps, HAS_MASK: tl.constexpr,
                     ACTIVE: tl.constexpr, UNBIASED: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * fan_in
    offs = tl.arange(0, BLOCK)
    n, mu, s, f, gc = _row_statistics(w_ptr, m_ptr, gy_ptr, base, fan_in, True, HAS_MASK, ACTIVE, UNBIASED, CENTER,
                                      BLOCK)
    r = 1.0 / tl.sqrt(tl.maximum(s, eps))
    tl.store(dg_ptr + row, gc * r)
    gain = tl.load(g_ptr + row).to(tl.float32)
    # d r / d c_j = -f r^3 c_j, zero where the eps floor holds r constant
    k = tl.where(s <= eps, 0.0, f * r * r * r * gain * gc)
    acc_dc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        inb = idx < fan_in
        c, m, gy = _centered_and_grad(w_ptr, m_ptr, gy_ptr, base, idx, inb, mu, HAS_MASK, ACTIVE)
        dc = gain * gy * r - k * c
        if HAS_MASK and ACTIVE:
            dc = dc * m
        acc_dc += dc
    mean_dc = tl.sum(acc_dc, axis=0) / tl.maximum(n, 1.0)
    for start in range(0, fan_in, BLOCK):
        idx = start + offs
        inb = idx < fan_in
        c, m, gy = _centered_and_grad(w_ptr, m_ptr, gy_ptr, base, idx, inb, mu, HAS_MASK, ACTIVE)
        dw = gain * gy * r - k * c
        if not CENTER:
            if HAS_MASK:
                dw = dw * m
        elif HAS_MASK and ACTIVE:
            dw = (dw * m - mean_dc) * m
        elif HAS_MASK:
            dw = (dw - mean_dc) * m
        else:
            dw = dw - mean_dc
        tl.store(dw_ptr + base + idx, dw, mask=inb)


def _rows_like(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """t (weight-shaped) as (out, fan_in) rows in the weight's memory order."""
    return layout.rows(t.contiguous(memory_format=layout.memory_format(weight)), weight.shape[0])


def _rows(weight: torch.Tensor, mask: torch.Tensor | None):
    """Weight and mask as (out, fan_in) rows in the weight's memory order (a channel's
    statistics do not depend on the order of its fan-in)."""
    w2 = layout.rows(weight, weight.shape[0])
    m2 = None
    if mask is not None:
        m2 = _rows_like(mask, weight)
        if m2.dtype == torch.bool:
            m2 = m2.view(torch.uint8)
    fan_in = w2.shape[1]
    return w2, m2, fan_in, min(1024, triton.next_power_of_2(max(fan_in, 16)))


def _flags(m2, active: bool, unbiased: bool, center: bool) -> dict:
    # uncentred: c = w * m, which is what ACTIVE computes with mu = 0; no variance factor
    return {"HAS_MASK": m2 is not None, "ACTIVE": active or m2 is None or not center,
            "UNBIASED": unbiased and center, "CENTER": center}


def standardize_forward(weight, gain, mask, active: bool, unbiased: bool, eps: float,
                        center: bool = True) -> torch.Tensor:
    w2, m2, fan_in, block = _rows(weight, mask)
    out = torch.empty_like(w2)
    _standardize_fwd[(w2.shape[0],)](w2, w2 if m2 is None else m2, gain, out, fan_in, eps,
                                     **_flags(m2, active, unbiased, center), BLOCK=block)
    return layout.from_rows(out, weight.shape, layout.is_channels_last(weight))


def standardize_backward(grad, weight, gain, mask, active: bool, unbiased: bool, eps: float, center: bool = True):
    """(dL/dweight, dL/dgain) given dL/dw_hat."""
    w2, m2, fan_in, block = _rows(weight, mask)
    gy = _rows_like(grad, weight)
    dw = torch.empty_like(w2)
    dg = torch.empty(w2.shape[0], dtype=torch.float32, device=w2.device)
    _standardize_bwd[(w2.shape[0],)](w2, w2 if m2 is None else m2, gain, gy, dw, dg, fan_in, eps,
                                     **_flags(m2, active, unbiased, center), BLOCK=block)
    return layout.from_rows(dw, weight.shape, layout.is_channels_last(weight)), dg.to(gain.dtype)

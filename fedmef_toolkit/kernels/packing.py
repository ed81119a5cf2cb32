"""SAP's activation packing and the masked ReLU, fused.

Packing a layer input for backward (per sample): given each row's k-th
largest |x| (the threshold t), one program per row keeps every entry with
|x| > t and the first entries equal to t (in row order) until exactly k are
kept, writing the keep bitmask and the kept values, in row order, in the
same pass. Unpacking is the inverse. Same result as
`sap.packing.pack_activation`'s top-k, without the sort, scatter and
compaction kernels and their temporaries; no host sync at any keep fraction.

Layout (private to these two kernels): bits are (rows, ceil(n/8)) bytes,
little-endian within a byte; values are (rows * k,) in the input dtype.

The masked ReLU computes gain * relu(x) (optionally clipped) and its 1-bit
pass mask in one kernel, in `sap.packing.pack_bits`'s flat layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_rows(x_ptr, t_ptr, bits_ptr, vals_ptr, n, nbytes, k, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    t = tl.load(t_ptr + row).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    boffs = tl.arange(0, BLOCK // 8)
    shifts = tl.arange(0, 8)
    above = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        a = tl.abs(tl.load(x_ptr + base + idx, mask=idx < n, other=0.0).to(tl.float32))
        above += ((a > t) & (idx < n)).to(tl.int32)
    ties_to_keep = k - tl.sum(above, axis=0)  # >= 1: t itself is among the top k
    kept = tl.sum(above, axis=0) * 0
    ties_seen = tl.sum(above, axis=0) * 0
    for start in range(0, n, BLOCK):
        idx = start + offs
        inb = idx < n
        x = tl.load(x_ptr + base + idx, mask=inb, other=0.0)
        a = tl.abs(x.to(tl.float32))
        tie = ((a == t) & inb).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, axis=0)
        keep = (((a > t) & inb) | ((tie != 0) & (tie_rank <= ties_to_keep))).to(tl.int32)
        byte = tl.sum(tl.reshape(keep, [BLOCK // 8, 8]) << shifts[None, :], axis=1)
        bidx = start // 8 + boffs
        tl.store(bits_ptr + row * nbytes + bidx, byte.to(tl.uint8), mask=bidx < nbytes)
        pos = kept + tl.cumsum(keep, axis=0) - 1
        tl.store(vals_ptr + row * k + pos, x, mask=keep != 0)
        kept += tl.sum(keep, axis=0)
        ties_seen += tl.sum(tie, axis=0)


@triton.jit
def _unpack_rows(bits_ptr, vals_ptr, out_ptr, n, nbytes, k, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    boffs = tl.arange(0, BLOCK // 8)
    shifts = tl.arange(0, 8)
    kept = tl.sum(offs, axis=0) * 0
    for start in range(0, n, BLOCK):
        bidx = start // 8 + boffs
        b = tl.load(bits_ptr + row * nbytes + bidx, mask=bidx < nbytes, other=0).to(tl.int32)
        keep = tl.reshape((b[:, None] >> shifts[None, :]) & 1, [BLOCK])
        idx = start + offs
        pos = kept + tl.cumsum(keep, axis=0) - 1
        v = tl.load(vals_ptr + row * k + pos, mask=keep != 0, other=0.0)
        tl.store(out_ptr + row * n + idx, v, mask=idx < n)
        kept += tl.sum(keep, axis=0)


@triton.jit
def _masked_relu_fwd(x_ptr, y_ptr, bits_ptr, numel, nbytes, gain, max_value,
                     HAS_MAX: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inb = idx < numel
    x = tl.load(x_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    if HAS_MAX:
        y = tl.minimum(tl.maximum(x, 0.0), max_value)
        passes = (x > 0.0) & (x < max_value) & inb
    else:
        y = tl.maximum(x, 0.0)
        passes = (x > 0.0) & inb
    # round to nearest even, as PyTorch does, when storing to a 16-bit dtype
    tl.store(y_ptr + idx, (y * gain).to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inb)
    byte = tl.sum(tl.reshape(passes.to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :], axis=1)
    bidx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(bits_ptr + bidx, byte.to(tl.uint8), mask=bidx < nbytes)


@triton.jit
def _masked_relu_bwd(gy_ptr, bits_ptr, gx_ptr, numel, nbytes, gain, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    bidx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    b = tl.load(bits_ptr + bidx, mask=bidx < nbytes, other=0).to(tl.int32)
    passes = tl.reshape((b[:, None] >> tl.arange(0, 8)[None, :]) & 1, [BLOCK])
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inb = idx < numel
    gy = tl.load(gy_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    gx = (gy * passes.to(tl.float32) * gain).to(gx_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(gx_ptr + idx, gx, mask=inb)


def _block(n: int) -> int:
    return min(2048, max(64, triton.next_power_of_2(n)))


def pack_rows(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, values) of the top-k |entries| of each row of a 2-d tensor."""
    rows = rows.contiguous()
    r, n = rows.shape
    # the k-th largest |x| per row; topk's values only, the indices are dropped at once
    t = torch.topk(rows.abs(), k, dim=1, sorted=False).values.amin(dim=1)
    nbytes = (n + 7) // 8
    bits = torch.empty((r, nbytes), dtype=torch.uint8, device=rows.device)
    vals = torch.empty(r * k, dtype=rows.dtype, device=rows.device)
    _pack_rows[(r,)](rows, t, bits, vals, n, nbytes, k, BLOCK=_block(n))
    return bits, vals


def unpack_rows(bits: torch.Tensor, vals: torch.Tensor, shape, k: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=vals.dtype, device=vals.device)
    r = shape[0]
    n = out.numel() // r
    _unpack_rows[(r,)](bits, vals, out, n, bits.shape[1], k, BLOCK=_block(n))
    return out


_ELEMENTWISE_BLOCK = 1024


def masked_relu_forward(x: torch.Tensor, gain: float, max_value: float | None):
    """(gain * relu(x) clipped at max_value if given, bitmask of where the gradient passes)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    nbytes = (x.numel() + 7) // 8
    bits = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
    _masked_relu_fwd[grid](x, y, bits, x.numel(), nbytes, float(gain), float(max_value or 0.0),
                           HAS_MAX=max_value is not None, BLOCK=_ELEMENTWISE_BLOCK)
    return y, bits


def masked_relu_backward(gy: torch.Tensor, bits: torch.Tensor, gain: float) -> torch.Tensor:
    gy = gy.contiguous()
    gx = torch.empty_like(gy)
    grid = (triton.cdiv(gy.numel(), _ELEMENTWISE_BLOCK),)
    _masked_relu_bwd[grid](gy, bits, gx, gy.numel(), bits.numel(), float(gain), BLOCK=_ELEMENTWISE_BLOCK)
    return gx

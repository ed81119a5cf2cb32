"""SAP's activation packing and the masked ReLU, fused.

Packing a layer input for backward (per sample) keeps, in each row, the k
entries of largest |x|: every entry above the row's k-th largest |x| (the
threshold t), and the first entries equal to t (in row order) until exactly
k are kept.

The threshold is found by a radix select on the bits of |x|: for
non-negative floats the bit patterns order as the values do, so |x|'s bits
without the sign are an integer key. Each pass histograms one 8-bit digit of
the keys that share the digits chosen so far (one program per chunk of a
row, counts added to the row's 256 bins atomically) and picks the digit
that holds the k-th largest: two passes for 16-bit floats, four for fp32.
It replaces torch.topk (six to nine kernels per layer, sorting-network
temporaries) and is exact: t is the k-th largest |x| itself.

Then rows are split into chunks, one program each: a first kernel counts,
per chunk, the keys above and equal to t; the second derives from those
counts where its chunk's kept values start and writes the keep bits and the
values, in row order, in one pass. Those start offsets are saved too (one
int32 per chunk), so unpacking is one parallel kernel as well. Same result
as `sap.packing.pack_activation`'s top-k, with no sort, scatter or
compaction kernels and no host sync at any keep fraction.

Layout (private to these kernels): bits are (rows, ceil(n/8)) bytes,
little-endian within a byte; values are (rows * k,) in the input dtype;
offsets are (rows, chunks) int32.

The masked ReLU computes gain * relu(x) (optionally clipped) and its 1-bit
pass mask in one kernel, in `sap.packing.pack_bits`'s flat layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layers import layout


@triton.jit
def _abs_key(x, KEY_BITS: tl.constexpr):
    """|x| as a non-negative int32 that orders as |x| does: the float's bits without the sign
    (NaN above inf, as torch.topk ranks it)."""
    if KEY_BITS == 15:  # a compile-time branch: only the one for x's width is built
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return key


@triton.jit
def _chosen_digits(hist_ptr, row, k, PASS: tl.constexpr, PASSES: tl.constexpr):
    """(key prefix, how many of the keys with that prefix are still to take) after passes
    0..PASS-1 of the radix select: each pass picks the digit holding the k-th largest key."""
    bins = tl.arange(0, 256)
    prefix = k * 0
    remaining = k + 0
    for q in tl.static_range(PASS):
        h = tl.load(hist_ptr + (row * PASSES + q) * 256 + bins)
        above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0)  # keys whose digit is larger than the bin's
        digit = tl.max(tl.where(above + h >= remaining, bins, 0), axis=0)
        remaining -= tl.sum(tl.where(bins == digit, above, 0), axis=0)
        prefix = prefix | (digit << (8 * (PASSES - 1 - q)))
    return prefix, remaining


@triton.jit
def _load_chunk(x_ptr, n, CHUNK: tl.constexpr):
    """This program's (row, chunk index, entry indices, in-row flags, values): chunk c of row r
    for program (r, c); entries past the row's end read as 0."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    inb = idx < n
    return row, c, idx, inb, tl.load(x_ptr + row * n + idx, mask=inb, other=0.0)


@triton.jit
def _radix_hist(x_ptr, hist_ptr, n, k, PASS: tl.constexpr, PASSES: tl.constexpr, KEY_BITS: tl.constexpr,
                CHUNK: tl.constexpr):
    """Pass PASS of the radix select, one chunk of a row: the histogram of digit PASS of the
    keys that carry the digits chosen so far, added to the row's bins."""
    row, c, idx, inb, x = _load_chunk(x_ptr, n, CHUNK)
    key = _abs_key(x, KEY_BITS)
    prefix, _ = _chosen_digits(hist_ptr, row, k, PASS, PASSES)
    shift: tl.constexpr = 8 * (PASSES - 1 - PASS)
    if PASS == 0:
        match = inb
    else:  # the digits above this one are the chosen ones (no shift by the key's full width)
        match = inb & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
    # entries that do not match go to bin 0 and are taken out of it again
    h = tl.histogram(tl.where(match, (key >> shift) & 255, 0), 256)
    bins = tl.arange(0, 256)
    h -= tl.where(bins == 0, CHUNK - tl.sum(match.to(tl.int32), axis=0), 0)
    tl.atomic_add(hist_ptr + (row * PASSES + PASS) * 256 + bins, h, mask=h != 0)


@triton.jit
def _count_chunk(x_ptr, hist_ptr, above_ptr, ties_ptr, n, k, chunks, PASSES: tl.constexpr,
                 KEY_BITS: tl.constexpr, CHUNK: tl.constexpr):
    """Per (row, chunk): keys above the row's threshold key, and equal to it."""
    row, c, idx, inb, x = _load_chunk(x_ptr, n, CHUNK)
    key = _abs_key(x, KEY_BITS)
    t, _ = _chosen_digits(hist_ptr, row, k, PASSES, PASSES)
    tl.store(above_ptr + row * chunks + c, tl.sum(((key > t) & inb).to(tl.int32), axis=0))
    tl.store(ties_ptr + row * chunks + c, tl.sum(((key == t) & inb).to(tl.int32), axis=0))


@triton.jit
def _pack_chunk(x_ptr, hist_ptr, above_ptr, ties_ptr, bits_ptr, vals_ptr, offsets_ptr, n, nbytes, k, chunks,
                PASSES: tl.constexpr, KEY_BITS: tl.constexpr, CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    """Keeps keys above t and the first ties in row order until k are kept; writes the chunk's
    keep bits, its kept values at their place in the row's value list, and that place."""
    row, c, idx, inb, x = _load_chunk(x_ptr, n, CHUNK)
    # where this chunk starts: from the row's per-chunk counts (a few dozen numbers)
    cs = tl.arange(0, MAX_CHUNKS)
    above = tl.load(above_ptr + row * chunks + cs, mask=cs < chunks, other=0)
    ties = tl.load(ties_ptr + row * chunks + cs, mask=cs < chunks, other=0)
    ties_to_keep = k - tl.sum(above, axis=0)  # >= 1: t itself is among the top k
    ties_before = tl.sum(tl.where(cs < c, ties, 0), axis=0)
    kept_before = tl.sum(tl.where(cs < c, above, 0), axis=0) + tl.minimum(ties_before, ties_to_keep)
    tl.store(offsets_ptr + row * chunks + c, kept_before)
    key = _abs_key(x, KEY_BITS)
    t, _ = _chosen_digits(hist_ptr, row, k, PASSES, PASSES)
    tie = ((key == t) & inb).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, axis=0)
    keep = (((key > t) & inb) | ((tie != 0) & (tie_rank <= ties_to_keep))).to(tl.int32)
    byte = tl.sum(tl.reshape(keep, [CHUNK // 8, 8]) << tl.arange(0, 8)[None, :], axis=1)
    bidx = c * (CHUNK // 8) + tl.arange(0, CHUNK // 8)
    tl.store(bits_ptr + row * nbytes + bidx, byte.to(tl.uint8), mask=bidx < nbytes)
    pos = kept_before + tl.cumsum(keep, axis=0) - 1
    tl.store(vals_ptr + row * k + pos, x, mask=keep != 0)


@triton.jit
def _unpack_chunk(bits_ptr, vals_ptr, offsets_ptr, out_ptr, n, nbytes, k, chunks, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    bidx = c * (CHUNK // 8) + tl.arange(0, CHUNK // 8)
    b = tl.load(bits_ptr + row * nbytes + bidx, mask=bidx < nbytes, other=0).to(tl.int32)
    keep = tl.reshape((b[:, None] >> tl.arange(0, 8)[None, :]) & 1, [CHUNK])
    pos = tl.load(offsets_ptr + row * chunks + c) + tl.cumsum(keep, axis=0) - 1
    v = tl.load(vals_ptr + row * k + pos, mask=keep != 0, other=0.0)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    tl.store(out_ptr + row * n + idx, v, mask=idx < n)


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


CHUNK = 2048  # entries per program: rows are split so that every SM gets work


def key_bits(dtype: torch.dtype) -> int:
    """Bits of |x|'s integer key (a float's bits without the sign)."""
    return 15 if dtype.itemsize == 2 else 31


def pack_rows(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bits, values, chunk offsets) of the top-k |entries| of each row of a 2-d tensor."""
    rows = rows.contiguous()
    r, n = rows.shape
    bits_of_key = key_bits(rows.dtype)
    passes = (bits_of_key + 7) // 8
    chunks = triton.cdiv(n, CHUNK)
    nbytes = (n + 7) // 8
    hist = torch.zeros((r, passes, 256), dtype=torch.int32, device=rows.device)
    for p in range(passes):  # the row's k-th largest |x|, one 8-bit digit per pass
        _radix_hist[(r, chunks)](rows, hist, n, k, PASS=p, PASSES=passes, KEY_BITS=bits_of_key, CHUNK=CHUNK)
    counts = torch.empty((2, r, chunks), dtype=torch.int32, device=rows.device)
    bits = torch.empty((r, nbytes), dtype=torch.uint8, device=rows.device)
    vals = torch.empty(r * k, dtype=rows.dtype, device=rows.device)
    offsets = torch.empty((r, chunks), dtype=torch.int32, device=rows.device)
    _count_chunk[(r, chunks)](rows, hist, counts[0], counts[1], n, k, chunks, PASSES=passes,
                              KEY_BITS=bits_of_key, CHUNK=CHUNK)
    _pack_chunk[(r, chunks)](rows, hist, counts[0], counts[1], bits, vals, offsets, n, nbytes, k, chunks,
                             PASSES=passes, KEY_BITS=bits_of_key, CHUNK=CHUNK,
                             MAX_CHUNKS=max(2, triton.next_power_of_2(chunks)))
    return bits, vals, offsets


def unpack_rows(bits: torch.Tensor, vals: torch.Tensor, offsets: torch.Tensor, shape, k: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=vals.dtype, device=vals.device)
    r, chunks = offsets.shape
    _unpack_chunk[(r, chunks)](bits, vals, offsets, out, out.numel() // r, bits.shape[1], k, chunks, CHUNK=CHUNK)
    return out


_ELEMENTWISE_BLOCK = 1024


def masked_relu_forward(x: torch.Tensor, gain: float, max_value: float | None):
    """(gain * relu(x) clipped at max_value if given, bitmask of where the gradient passes);
    elementwise over x's memory (a channels-last x stays channels-last, its bits in that order)."""
    x = x.contiguous(memory_format=layout.memory_format(x))
    y = torch.empty_like(x)
    nbytes = (x.numel() + 7) // 8
    bits = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
    _masked_relu_fwd[grid](x, y, bits, x.numel(), nbytes, float(gain), float(max_value or 0.0),
                           HAS_MAX=max_value is not None, BLOCK=_ELEMENTWISE_BLOCK)
    return y, bits


def masked_relu_backward(gy: torch.Tensor, bits: torch.Tensor, gain: float) -> torch.Tensor:
    """gy (in the memory format the forward's x had) times the pass mask and the gain."""
    gy = gy.contiguous(memory_format=layout.memory_format(gy))
    gx = torch.empty_like(gy)
    grid = (triton.cdiv(gy.numel(), _ELEMENTWISE_BLOCK),)
    _masked_relu_bwd[grid](gy, bits, gx, gy.numel(), bits.numel(), float(gain), BLOCK=_ELEMENTWISE_BLOCK)
    return gx

"""The fused kernels against their PyTorch references, on one device.

Run by tests/test_kernels.py: on the CPU in a subprocess under Triton's
interpreter (TRITON_INTERPRET=1 must be set before the kernels are
imported), and directly on a GPU when there is one.
"""

from __future__ import annotations

import os
import sys

import torch

from fedmef_toolkit.kernels.packing import CHUNK, masked_relu_backward, masked_relu_forward, pack_rows, unpack_rows
from fedmef_toolkit.kernels.standardize import standardize_backward, standardize_forward
from fedmef_toolkit.layers.nsconv import standardize_weight_reference
from fedmef_toolkit.sap.packing import keep_count, pack_bits, topk_keep_mask, unpack_bits


def check_standardize(dev):
    gen = torch.Generator().manual_seed(0)
    for shape in [(8, 3, 3, 3), (6, 40, 3, 3), (4, 1100), (5, 2)]:  # 1100: more than one block per row
        for stats, unbiased, center in [("active", False, True), ("active", True, True), ("all", False, True),
                                        ("all", True, True), ("active", False, False)]:
            for masked in (True, False):
                w = torch.randn(shape, generator=gen).to(dev).requires_grad_()
                g = (torch.rand(shape[0], generator=gen) + 0.5).to(dev).requires_grad_()
                m = None
                if masked:
                    m = (torch.rand(shape, generator=gen) < 0.3).float()
                    m[0] = 0  # a channel without active entries: w_hat = 0
                    m[1] = 0
                    m[1].view(-1)[0] = 1  # one active entry: the eps floor
                    m = m.to(dev)
                ref = standardize_weight_reference(w, g, m, stats, unbiased, 1e-4, center)
                out = standardize_forward(w.detach(), g.detach(), m, stats == "active", unbiased, 1e-4, center)
                what = f"{shape} {stats} unbiased={unbiased} masked={masked} center={center}"
                torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6, msg=what)
                gy = torch.randn(shape, generator=gen).to(dev)
                dw_ref, dg_ref = torch.autograd.grad(ref, (w, g), gy)
                dw, dg = standardize_backward(gy, w.detach(), g.detach(), m, stats == "active", unbiased, 1e-4,
                                              center)
                torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-5, msg=what)
                torch.testing.assert_close(dg, dg_ref, rtol=1e-4, atol=1e-5, msg=what)


def check_pack_rows(dev):
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, gamma in [(3000, 0.9), (3000, 0.5), (37, 0.5), (4096, 0.0001)]:
            x = torch.randn(5, n, generator=gen).relu().to(dev, dtype)  # many zeros: ties at t = 0
            k = keep_count(n, gamma)
            bits, vals, offsets = pack_rows(x, k)
            assert vals.numel() == 5 * k and bits.shape == (5, (n + 7) // 8)
            out = unpack_rows(bits, vals, offsets, x.shape, k)
            ref = x * topk_keep_mask(x, gamma, per_sample=True)
            # ties may pick other entries than topk, but only entries equal in |x|: the kept
            # values, and so the pruned tensor, are the same wherever the tied value is 0
            kept = out != 0
            assert torch.equal(out[kept], x[kept]), (n, gamma, dtype)
            assert torch.equal(out.float().abs().sort(dim=1).values, ref.float().abs().sort(dim=1).values)
    # ties at a nonzero threshold: exactly k kept, all larger ones kept, the first ties in row order
    x = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5, 2.0, 2.0, 4.0, 2.0]], device=dev)
    bits, vals, offsets = pack_rows(x, 4)
    out = unpack_rows(bits, vals, offsets, x.shape, 4)
    assert out.tolist() == [[0.0, 3.0, 2.0, 2.0, 0.0, 0.0, 0.0, 4.0, 0.0]], out.tolist()
    assert vals.tolist() == [3.0, 2.0, 2.0, 4.0]
    # the same across chunk boundaries: ties spread over chunks, only the first ones kept
    n = 3 * CHUNK + 5
    x = torch.zeros(2, n, device=dev)
    x[:, ::7] = 2.0  # ties everywhere
    x[:, 5] = 9.0
    x[1, n - 1] = 8.0
    k = 40
    bits, vals, offsets = pack_rows(x, k)
    out = unpack_rows(bits, vals, offsets, x.shape, k)
    for r in range(2):
        big = 1 + r
        tie_cols = torch.nonzero(x[r] == 2.0).flatten()[: k - big]
        expect = torch.zeros(n, device=dev)
        expect[tie_cols] = 2.0
        expect[5] = 9.0
        if r == 1:
            expect[n - 1] = 8.0
        assert torch.equal(out[r], expect), r


def check_radix_select(dev):
    """The packed values are exactly the k largest |x| of each row (signs, zeros, subnormals,
    inf, rows shorter and longer than a chunk, keep counts from 1 to n), in every float dtype."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 9, 300, CHUNK + 17, 5 * CHUNK + 3):
            x = torch.randn(3, n, generator=gen) * torch.logspace(-8, 4, n)[torch.randperm(n, generator=gen)]
            x[0, : n // 3] = 0.0
            if n > 5:
                x[1, 2], x[1, 3], x[2, 4] = float("inf"), float("-inf"), -1e-40  # -1e-40: subnormal in fp32
                x[2, 1] = float("nan")  # ranks above inf, as in torch.topk
            x = x.to(dev, dtype)
            for k in sorted({1, max(1, n // 2), max(1, n - 1), n}):
                bits, vals, offsets = pack_rows(x, k)
                expect = x.float().abs().topk(k, dim=1).values.sort(dim=1).values
                got = vals.view(3, k).float().abs().sort(dim=1).values
                torch.testing.assert_close(got, expect, rtol=0, atol=0, equal_nan=True, msg=str((dtype, n, k)))
                kept = unpack_bits(bits.reshape(-1), 8 * bits.numel()).view(3, -1)[:, :n]
                assert kept.sum(dim=1).tolist() == [k] * 3, (dtype, n, k)
                out = unpack_rows(bits, vals, offsets, x.shape, k)
                assert torch.equal(out[kept].nan_to_num(7.0), x[kept].nan_to_num(7.0)) and not out[~kept].any(), (dtype, n, k)


class _Counting:
    """A kernel launcher that records its launches (which path ran)."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def check_agc(dev):
    """The fused clipping equals the PyTorch clipping: rows clipped, rows under the bound and
    zero rows (eps), fan-ins below and above a block."""
    from fedmef_toolkit.fl.agc import _unit_norms
    from fedmef_toolkit.kernels.agc import clip_rows_

    gen = torch.Generator().manual_seed(5)
    for shape in [(8, 3, 3, 3), (5, 1500), (4, 2)]:
        w = torch.randn(shape, generator=gen)
        w[1] = 0.0  # bound clip * eps
        g = torch.randn(shape, generator=gen) * torch.logspace(-4, 2, shape[0]).view(-1, *[1] * (len(shape) - 1))
        scale = (_unit_norms(w).clamp_min(1e-3) * 0.1 / _unit_norms(g).clamp_min(1e-6)).clamp_max(1.0)
        expect = g * scale.view(-1, *[1] * (len(shape) - 1))
        assert (scale < 1).any() and (scale == 1).any(), shape  # both cases occur
        formats = [torch.contiguous_format] + ([torch.channels_last] if len(shape) == 4 else [])
        for fmt in formats:  # channels-last: each unit is still one contiguous row of memory
            got = g.to(dev).contiguous(memory_format=fmt)
            clip_rows_(w.to(dev).contiguous(memory_format=fmt), got, 0.1, 1e-3)
            torch.testing.assert_close(got.cpu(), expect, rtol=1e-5, atol=1e-7, msg=f"{shape} {fmt}")
    import fedmef_toolkit.kernels.agc as agc_kernels
    from fedmef_toolkit.fl.agc import clip_units_

    for shape in [(8, 1, 3, 3), (8, 8, 1, 1), (8, 4, 3, 3)]:  # depthwise and 1x1: both layouts at once
        w = torch.randn(shape, generator=gen).to(dev).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, generator=gen).to(dev) * 10  # contiguous: as a backward may give it
        scale = (_unit_norms(w).clamp_min(1e-3) * 0.1 / _unit_norms(g).clamp_min(1e-6)).clamp_max(1.0)
        calls = []
        original = agc_kernels._agc_rows
        agc_kernels._agc_rows = _Counting(original, calls)
        try:
            got = g.clone()
            clip_units_(w, got, 0.1)
        finally:
            agc_kernels._agc_rows = original
        fused = shape != (8, 4, 3, 3)  # a strictly channels-last weight and a contiguous gradient: PyTorch
        assert bool(calls) == fused, shape
        torch.testing.assert_close(got, g * scale.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6, msg=str(shape))
    w, g = torch.ones(3, 4), torch.ones(3, 4)
    w[0, 1], g[1, 2] = float("nan"), float("nan")  # a diverged row stays NaN, the others are clipped
    got = g.to(dev)
    clip_rows_(w.to(dev), got, 0.1, 1e-3)
    assert got[:2].isnan().all() and torch.allclose(got[2].cpu(), torch.full((4,), 0.1))


def same_values(a, b, dev):
    """Bitwise on a GPU. Triton's CPU interpreter truncates fp32 -> bf16 instead of
    rounding to nearest (its own limitation): one bf16 unit there."""
    if dev.type == "cuda" or a.dtype != torch.bfloat16:
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=2.0 ** -7, atol=0.0)


def check_masked_relu(dev):
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        for numel, gain, max_value in [(1000, 1.0, None), (4099, 1.7129, None), (77, 1.0, 6.0)]:
            x = (torch.randn(numel, generator=gen) * 4).to(dev, dtype)
            x[:5] = torch.tensor([0.0, 6.0, -0.0, 5.99, 6.01], dtype=dtype)
            y, bits = masked_relu_forward(x, gain, max_value)
            ref = (torch.relu(x) if max_value is None else torch.clamp(x, 0.0, max_value))
            ref = ref * gain if gain != 1.0 else ref
            assert same_values(y, ref, dev), (numel, gain, max_value, dtype)
            passes = (x > 0) if max_value is None else (x > 0) & (x < max_value)
            assert torch.equal(bits, pack_bits(passes))
            gy = torch.randn(numel, generator=gen).to(dev, dtype)
            g = gy * passes
            assert same_values(masked_relu_backward(gy, bits, gain), g * gain if gain != 1.0 else g, dev)


def check_sap_layers_against_the_pytorch_path(dev):
    """A masked NSConv -> SAP conv -> masked ReLU -> SAP linear chain: the gradients with
    the fused kernels equal those of the PyTorch implementation, in channels-first and in
    channels-last memory format (where the fused kernels keep the layout)."""
    from fedmef_toolkit.layers import layout
    from fedmef_toolkit.layers.nsconv import NSConv2d
    from fedmef_toolkit.sap.functions import SAPConfig, masked_relu, sap_linear

    torch.manual_seed(3)
    conv = NSConv2d(3, 8, 3, padding=1).to(dev)
    conv.register_buffer("weight_mask", (torch.rand_like(conv.weight) < 0.5).float())
    fc = torch.nn.Linear(8 * 6 * 6, 5).to(dev)
    x = torch.randn(4, 3, 6, 6, device=dev)
    for gamma in (0.5, 0.9):
        conv.sap = SAPConfig(gamma)
        grads = {}
        for fmt in (torch.contiguous_format, torch.channels_last):
            conv.to(memory_format=fmt)
            for kernels in ("triton", "torch"):
                os.environ["FEDMEF_KERNELS"] = kernels
                h = masked_relu(conv(x.contiguous(memory_format=fmt)), 1.7129)
                assert layout.is_channels_last(h) == (fmt == torch.channels_last), (kernels, fmt)
                loss = sap_linear(h.flatten(1), fc.weight, fc.bias, SAPConfig(gamma)).square().sum()
                params = (conv.weight, conv.gain, conv.bias, fc.weight, fc.bias)
                grads[kernels, fmt] = torch.autograd.grad(loss, params)  # what a step sees (not .grad)
                assert layout.is_channels_last(grads[kernels, fmt][0]) == (fmt == torch.channels_last), (kernels, fmt)
            os.environ.pop("FEDMEF_KERNELS")
        reference = grads["torch", torch.contiguous_format]
        for key, got in grads.items():
            for a, b in zip(got, reference):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=str(key))


def run_all(dev: str) -> None:
    check_standardize(torch.device(dev))
    check_pack_rows(torch.device(dev))
    check_radix_select(torch.device(dev))
    check_agc(torch.device(dev))
    check_masked_relu(torch.device(dev))
    check_sap_layers_against_the_pytorch_path(torch.device(dev))


if __name__ == "__main__":
    run_all(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("kernel checks passed")


def compile_for_hopper() -> list[str]:
    """Compile every kernel variant for sm_90 with Triton's bundled toolchain (no GPU needed):
    type and lowering errors that the interpreter cannot see surface here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fedmef_toolkit.kernels import agc, packing, standardize

    target = GPUTarget("cuda", 90, 32)
    done = []

    def build(fn, args: dict, consts: dict):
        signature = {**args, **{k: "constexpr" for k in consts}}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target)
        done.append(f"{fn.__name__} {consts}")

    rows = {"w_ptr": "*fp32", "m_ptr": "*fp32", "g_ptr": "*fp32"}
    variants = [(a, u, True) for a in (True, False) for u in (True, False)] + [(True, False, False)]
    for has_mask in (True, False):
        for active, unbiased, center in variants:
            c = {"HAS_MASK": has_mask, "ACTIVE": active, "UNBIASED": unbiased, "CENTER": center, "BLOCK": 1024}
            build(standardize._standardize_fwd, {**rows, "out_ptr": "*fp32", "fan_in": "i32", "eps": "fp32"}, c)
            build(standardize._standardize_bwd, {**rows, "gy_ptr": "*fp32", "dw_ptr": "*fp32", "dg_ptr": "*fp32",
                                                 "fan_in": "i32", "eps": "fp32"}, c)
    build(agc._agc_rows, {"w_ptr": "*fp32", "g_ptr": "*fp32", "fan_in": "i32", "clip": "fp32", "eps": "fp32"},
          {"BLOCK": 1024})
    for dt in ("fp32", "bf16", "fp16"):
        key = {"KEY_BITS": 31 if dt == "fp32" else 15}
        passes = 4 if dt == "fp32" else 2
        for p in range(passes):
            build(packing._radix_hist, {"x_ptr": f"*{dt}", "hist_ptr": "*i32", "n": "i32", "k": "i32"},
                  {"PASS": p, "PASSES": passes, **key, "CHUNK": 2048})
        build(packing._count_chunk, {"x_ptr": f"*{dt}", "hist_ptr": "*i32", "above_ptr": "*i32", "ties_ptr": "*i32",
                                     "n": "i32", "k": "i32", "chunks": "i32"}, {"PASSES": passes, **key, "CHUNK": 2048})
        build(packing._pack_chunk, {"x_ptr": f"*{dt}", "hist_ptr": "*i32", "above_ptr": "*i32", "ties_ptr": "*i32",
                                    "bits_ptr": "*u8", "vals_ptr": f"*{dt}", "offsets_ptr": "*i32", "n": "i32",
                                    "nbytes": "i32", "k": "i32", "chunks": "i32"},
              {"PASSES": passes, **key, "CHUNK": 2048, "MAX_CHUNKS": 32})
        build(packing._unpack_chunk, {"bits_ptr": "*u8", "vals_ptr": f"*{dt}", "offsets_ptr": "*i32",
                                      "out_ptr": f"*{dt}", "n": "i32", "nbytes": "i32", "k": "i32", "chunks": "i32"},
              {"CHUNK": 2048})
        for has_max in (True, False):
            build(packing._masked_relu_fwd, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "bits_ptr": "*u8", "numel": "i32",
                                             "nbytes": "i32", "gain": "fp32", "max_value": "fp32"},
                  {"HAS_MAX": has_max, "BLOCK": 1024})
        build(packing._masked_relu_bwd, {"gy_ptr": f"*{dt}", "bits_ptr": "*u8", "gx_ptr": f"*{dt}", "numel": "i32",
                                         "nbytes": "i32", "gain": "fp32"}, {"BLOCK": 1024})
    return done

"""Autograd functions that save a pruned input for backward (SAP, SPEC section 5).

Forward is the exact dense computation. What is saved is the top-(1-gamma)
of the input by magnitude, packed (bitmask + values). Backward gives the
exact input gradient (it needs only the weight) and the weight gradient of
the pruned input. Under autocast the functions cast to the autocast dtype
themselves and run the kernels with autocast off, so forward and backward
see the same dtypes on every torch version we support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..kernels import use_triton
from ..layers import layout
from .packing import keep_count, pack_activation, pack_bits, unpack_activation, unpack_bits


@dataclass(frozen=True)
class SAPConfig:
    gamma: float = 0.5
    per_sample: bool = True


def selection_rows(x: torch.Tensor, cfg: SAPConfig) -> torch.Tensor:
    """x as a matrix whose rows select their top entries independently: one per sample
    (per_sample) or one for the whole tensor; in x's memory order (a channels-last input
    stays where it is: which entries are kept does not depend on the order, only which of
    equal ones are)."""
    return layout.rows(x, x.shape[0] if cfg.per_sample else 1)


def autocast_dtype(dev: str):
    """The autocast dtype active for device type `dev`, or None."""
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except TypeError:  # torch < 2.4 signatures
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _cast_for_autocast(x, weight, bias):
    """Inputs in the autocast dtype (if autocast is on) and the dtypes the grads must have."""
    in_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return x, weight, bias, in_dtypes


class _SavedInput:
    """Packs/unpacks the saved input; gamma == 0 keeps it dense (exactly dense training).

    Per-sample selection on a GPU runs the fused kernels (kernels/packing.py),
    otherwise the PyTorch packing; which one packed is remembered for unpacking.
    """

    @staticmethod
    def pack(ctx, x: torch.Tensor, cfg: SAPConfig) -> list[torch.Tensor]:
        ctx.x_shape, ctx.cfg = x.shape, cfg
        ctx.memory_format = layout.memory_format(x)
        if cfg.gamma == 0.0:
            ctx.packing = "dense"
            return [x]
        rows = selection_rows(x, cfg)
        ctx.rows_shape = rows.shape
        if cfg.per_sample and use_triton(x):
            from ..kernels.packing import pack_rows

            ctx.packing = "fused"
            ctx.keep = keep_count(rows.shape[1], cfg.gamma)
            return list(pack_rows(rows, ctx.keep))
        ctx.packing = "torch"
        return list(pack_activation(rows, cfg.gamma, per_sample=True))

    @staticmethod
    def unpack(ctx, saved) -> torch.Tensor:
        if ctx.packing == "dense":
            return saved[0]
        if ctx.packing == "fused":
            from ..kernels.packing import unpack_rows

            rows = unpack_rows(saved[0], saved[1], saved[2], ctx.rows_shape, ctx.keep)
        else:
            rows = unpack_activation(saved[0], saved[1], ctx.rows_shape)
        return layout.from_rows(rows, ctx.x_shape, ctx.memory_format == torch.channels_last)


class SAPConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, cfg, recompute_weight=None):
        x, weight, bias, in_dtypes = _cast_for_autocast(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        saved = _SavedInput.pack(ctx, x.detach(), cfg)
        # A derived weight (NSConv's standardised one) is recomputed in backward instead of
        # kept: one weight-sized tensor less per layer between forward and backward.
        ctx.recompute = recompute_weight
        ctx.compute_dtype = weight.dtype
        ctx.save_for_backward(*([] if recompute_weight is not None else [weight]), *saved)
        ctx.conf = (stride, padding, dilation, groups, bias is not None, in_dtypes)
        return y

    @staticmethod
    def backward(ctx, gy):
        if ctx.recompute is not None:
            saved = list(ctx.saved_tensors)
            with torch.no_grad():
                weight = ctx.recompute().to(ctx.compute_dtype)
        else:
            weight, *saved = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias, in_dtypes = ctx.conf
        gy = gy.to(weight.dtype)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = has_bias and ctx.needs_input_grad[2]
        # One convolution_backward for all three: the input gradient reads only the weight (exact),
        # the weight gradient the pruned input. (torch.nn.grad.conv2d_input hands cuDNN an expanded
        # stand-in input, which it first copies to a full input-sized tensor: a strided copy per
        # layer, a fifth of a FedMef ResNet18 step's GPU time at batch 640 on an H200, measured.)
        if need_w:
            x_in = _SavedInput.unpack(ctx, saved)
        else:  # its values are not read: an input-shaped tensor in the layout of x
            x_in = torch.empty(ctx.x_shape, dtype=weight.dtype, device=gy.device, memory_format=ctx.memory_format)
        del saved
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x_in, weight, [weight.shape[0]] if need_b else None, _pair(stride), _pair(padding), _pair(dilation),
            False, [0, 0], groups, [need_x, need_w, need_b])
        gx = gx.to(in_dtypes[0]) if need_x else None
        gw = gw.to(in_dtypes[1]) if need_w else None
        gb = gb.to(in_dtypes[2]) if need_b else None
        return gx, gw, gb, None, None, None, None, None, None


class SAPLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg):
        x, weight, bias, in_dtypes = _cast_for_autocast(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight, bias)
        saved = _SavedInput.pack(ctx, x.detach(), cfg)
        ctx.save_for_backward(weight, *saved)
        ctx.conf = (bias is not None, in_dtypes)
        return y

    @staticmethod
    def backward(ctx, gy):
        weight, *saved = ctx.saved_tensors
        has_bias, in_dtypes = ctx.conf
        gy = gy.to(weight.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ weight).to(in_dtypes[0])
        if ctx.needs_input_grad[1]:
            x_pruned = _SavedInput.unpack(ctx, saved)
            gw = (gy.reshape(-1, gy.shape[-1]).t() @ x_pruned.reshape(-1, x_pruned.shape[-1])).to(in_dtypes[1])
        if has_bias and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(in_dtypes[2])
        return gx, gw, gb, None


class MaskedReLUFunction(torch.autograd.Function):
    """gain * relu(x) (optionally clipped at max_value) saving a 1-bit mask, not its output."""

    @staticmethod
    def forward(ctx, x, gain, max_value):
        ctx.shape, ctx.gain, ctx.fused = x.shape, gain, use_triton(x)
        ctx.memory_format = layout.memory_format(x)  # the fused kernels keep x's layout
        if ctx.fused:
            from ..kernels.packing import masked_relu_forward

            y, bits = masked_relu_forward(x, gain, max_value)
            ctx.save_for_backward(bits)
            return y
        y = torch.relu(x) if max_value is None else torch.clamp(x, 0.0, max_value)
        pass_mask = x > 0 if max_value is None else (x > 0) & (x < max_value)
        ctx.save_for_backward(pack_bits(pass_mask))
        return y * gain if gain != 1.0 else y

    @staticmethod
    def backward(ctx, gy):
        (bits,) = ctx.saved_tensors
        if ctx.fused:
            from ..kernels.packing import masked_relu_backward

            return masked_relu_backward(gy.contiguous(memory_format=ctx.memory_format), bits, ctx.gain), None, None
        mask = unpack_bits(bits, gy.numel()).view(ctx.shape)
        g = gy * mask
        return (g * ctx.gain if ctx.gain != 1.0 else g), None, None


def sap_conv2d(x, weight, bias, stride, padding, dilation, groups, cfg: SAPConfig, recompute_weight=None):
    """recompute_weight: a no-argument callable that returns `weight` again in backward
    (the parameters do not change between a forward and its backward)."""
    return SAPConv2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, cfg, recompute_weight)


def sap_linear(x, weight, bias, cfg: SAPConfig):
    return SAPLinearFunction.apply(x, weight, bias, cfg)


def masked_relu(x, gain: float = 1.0, max_value: float | None = None):
    return MaskedReLUFunction.apply(x, gain, max_value)

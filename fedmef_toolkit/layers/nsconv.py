"""Normalized Sparse Convolution (NSConv), SPEC section 4.

The effective weight is standardised per output channel over the active
(unmasked) entries:

    w_hat = g * (w - mu) / sqrt(max(n * var, eps)) * m

so every filter has zero mean and unit L2 norm over its active entries. With
zero-mean weights, a conv's output no longer depends on the mean of its
input, and with unit-norm filters its variance is the input's variance: this
is what lets the network drop BatchNorm, train at any batch size, and makes
small input activations safe to drop (SAP).

Edge cases, by construction: a channel with no active entry has w_hat = 0
(n is clamped to 1 for the mean, and the mask zeroes the output); with one
active entry, w - mu = 0 and n * var = 0 < eps, so w_hat = 0 without a
division by zero. Gradients stay finite in both cases.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import use_triton
from . import layout


def _stats(w2, m2, stats, unbiased, eps, center=True):
    """Centered weight c, per-channel 1/sqrt(max(n var, eps)) r, the variance factor f
    and whether the eps floor is active. w2, m2: (out, fan_in); m2 float or None.
    Without `center`, c is the masked weight itself and r its inverse L2 norm."""
    fan_in = w2.shape[1]
    if not center:
        c = w2 if m2 is None else w2 * m2
        s = (c * c).sum(dim=1, keepdim=True)
        return c, torch.rsqrt(s.clamp_min(eps)), None, s <= eps
    if m2 is not None and stats == "active":
        n = m2.sum(dim=1, keepdim=True)
        mu = (w2 * m2).sum(dim=1, keepdim=True) / n.clamp_min(1.0)
        c = (w2 - mu) * m2
    else:
        n = torch.full((w2.shape[0], 1), float(fan_in), dtype=w2.dtype, device=w2.device)
        wm = w2 if m2 is None else w2 * m2
        mu = wm.sum(dim=1, keepdim=True) / n
        c = wm - mu
    s = (c * c).sum(dim=1, keepdim=True)
    f = None  # the unbiased factor n / (n - 1); None means 1 (skips a kernel per call)
    if unbiased:
        f = n / (n - 1.0).clamp_min(1.0)
        s = f * s
    floored = s <= eps
    r = torch.rsqrt(s.clamp_min(eps))
    return c, r, f, floored


class _Standardize(torch.autograd.Function):
    """w_hat = g * c * r * m with a hand-written backward that saves only the
    per-channel statistics: autograd's version would keep about four
    weight-sized intermediates per layer alive until backward."""

    @staticmethod
    def forward(ctx, weight, gain, mask, stats, unbiased, eps, center):
        ctx.save_for_backward(weight, gain, mask)
        ctx.conf = (stats, unbiased, eps, center)
        if use_triton(weight):  # one fused kernel instead of a dozen small ones
            from ..kernels.standardize import standardize_forward

            return standardize_forward(weight, gain, mask, stats == "active", unbiased, eps, center)
        return standardize_weight_reference(weight, gain, mask, stats, unbiased, eps, center)

    @staticmethod
    def backward(ctx, grad):
        weight, gain, mask = ctx.saved_tensors
        stats, unbiased, eps, center = ctx.conf
        if use_triton(weight):
            from ..kernels.standardize import standardize_backward

            dw, dg = standardize_backward(grad, weight, gain, mask, stats == "active", unbiased, eps, center)
            return dw, dg, None, None, None, None, None
        out_ch = weight.shape[0]
        w2 = weight.reshape(out_ch, -1)
        m2 = None if mask is None else mask.reshape(out_ch, -1).to(w2.dtype)
        c, r, f, floored = _stats(w2, m2, stats, unbiased, eps, center)
        g2 = grad.reshape(out_ch, -1).to(w2.dtype)
        active_masked = m2 is not None and (stats == "active" or not center)
        if m2 is not None and not active_masked:
            g2 = g2 * m2  # with active statistics c is already 0 where pruned, and dc is masked below
        grad_gain = (g2 * c).sum(dim=1) * r.squeeze(1)
        u = g2 * gain.reshape(out_ch, 1)  # dL/d(c * r)
        uc = (u * c).sum(dim=1, keepdim=True)
        # d r / d c_j = -f r^3 c_j (zero where the eps floor holds r constant)
        k = r ** 3 * uc if f is None else f * r ** 3 * uc
        dc = u * r - torch.where(floored, torch.zeros_like(r), k) * c
        if not center:  # c = w * m: no mean to differentiate through
            dw = dc if m2 is None else dc * m2
        elif active_masked:
            n = m2.sum(dim=1, keepdim=True).clamp_min(1.0)
            dc = dc * m2
            dw = (dc - (dc.sum(dim=1, keepdim=True) / n)) * m2
        else:
            dw = dc - dc.mean(dim=1, keepdim=True)
            if m2 is not None:
                dw = dw * m2
        # in the weight's memory format (channels-last client models), as the fused kernel gives it
        dw = dw.reshape_as(weight).contiguous(memory_format=layout.memory_format(weight))
        return dw, grad_gain.to(gain.dtype), None, None, None, None, None


def standardize_weight(
    weight: torch.Tensor,
    gain: torch.Tensor,
    mask: torch.Tensor | None = None,
    stats: str = "active",
    unbiased: bool = False,
    eps: float = 1e-4,
    center: bool = True,
) -> torch.Tensor:
    """Return g * (w - mu) / sqrt(max(n * var, eps)) * m, per output channel.

    stats="active": mu and var over the active entries (the paper's form);
    stats="all": over all fan-in entries, zeros included, then masked (the
    authors' final research variant). `unbiased` uses n - 1 in the variance.
    center=False: g * w * m / sqrt(max(sum (w m)^2, eps)), unit norm without
    the mean (`stats` and `unbiased` do not apply).
    """
    if stats not in ("active", "all"):
        raise ValueError(f"stats must be 'active' or 'all', got {stats!r}")
    return _Standardize.apply(weight, gain, mask, stats, unbiased, eps, center)


def standardize_weight_reference(weight, gain, mask=None, stats="active", unbiased=False, eps=1e-4, center=True):
    """The map in plain tensor ops: the forward of the custom function, and (differentiated
    by autograd) the reference its hand-written backward is tested against."""
    out_ch = weight.shape[0]
    w2 = weight.reshape(out_ch, -1)
    m2 = None if mask is None else mask.reshape(out_ch, -1).to(w2.dtype)
    c, r, f, floored = _stats(w2, m2, stats, unbiased, eps, center)
    w_hat = c * (r * gain.reshape(out_ch, 1))  # per-channel factor first: one full-size multiply
    if m2 is not None and stats == "all" and center:  # with active statistics c is already 0 where pruned
        w_hat = w_hat * m2
    return w_hat.reshape_as(weight)


class _OnesResponse(torch.autograd.Function):
    """conv(ones, w) for one image; saves no tensor for backward (the ones are made again)."""

    @staticmethod
    def forward(ctx, w, shape, stride, padding, dilation, groups):
        ctx.conf = (shape, w.shape, stride, padding, dilation, groups)
        ones = torch.ones(shape, dtype=w.dtype, device=w.device)
        return F.conv2d(ones, w, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        shape, w_shape, stride, padding, dilation, groups = ctx.conf
        ones = torch.ones(shape, dtype=grad.dtype, device=grad.device)
        gw = torch.nn.grad.conv2d_weight(ones, w_shape, grad, stride, padding, dilation, groups)
        return gw, None, None, None, None, None


def response_to_ones(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """conv(ones) for one image shaped like x: with it, conv(x) - c * conv(ones) = conv(x - c),
    the input centred by its expected mean c and then zero-padded (`NSConv2d.input_mean`:
    an uncentred filter would otherwise pass a ReLU output's positive mean on)."""
    return _OnesResponse.apply(w.to(x.dtype), (1, *x.shape[1:]), stride, padding, dilation, groups)


class NSConv2d(nn.Conv2d):
    """Conv2d with a per-output-channel standardised weight and learned gain.

    A mask, when present, is the buffer `weight_mask` (attached by the
    pruning code); without one the layer is a dense weight-standardised conv.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, stats: str = "active", unbiased: bool = False, eps: float = 1e-4, center: bool = True,
                 input_mean: float = 0.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if stats not in ("active", "all"):
            raise ValueError(f"stats must be 'active' or 'all', got {stats!r}")
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.stats = stats
        self.unbiased = unbiased
        self.eps = eps
        self.center = center
        self.input_mean = input_mean
        self.sap = None  # set by fedmef_toolkit.sap.enable_sap

    def standardized_weight(self) -> torch.Tensor:
        mask = getattr(self, "weight_mask", None)
        return standardize_weight(self.weight, self.gain, mask, self.stats, self.unbiased, self.eps, self.center)

    # the effective-weight gradient being recorded (`start_effective_grad`); class defaults, so
    # that layers pickled before these existed load and run
    _recording = False
    _effective_grad: torch.Tensor | None = None

    def start_effective_grad(self) -> None:
        """Record, over the backward passes that follow, the loss gradient wrt the standardised
        weight w_hat (summed). Growth needs it: dL/dw is zero at pruned entries by construction,
        dL/dw_hat is dense."""
        self._recording, self._effective_grad = True, None

    def stop_effective_grad(self) -> torch.Tensor | None:
        """Stop recording; the sum recorded since `start_effective_grad` (None: no backward pass
        reached w_hat)."""
        recorded, self._recording, self._effective_grad = self._effective_grad, False, None
        return recorded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.standardized_weight()
        if self._recording and w.requires_grad:
            w.register_hook(self._accumulate_effective_grad)
        if self.sap is not None and self.training and torch.is_grad_enabled():
            from ..sap.functions import sap_conv2d

            y = sap_conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups, self.sap,
                           recompute_weight=self.standardized_weight)
        else:
            y = F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.input_mean:
            y = y - self.input_mean * response_to_ones(x, w, self.stride, self.padding, self.dilation, self.groups)
        return y

    def _accumulate_effective_grad(self, grad: torch.Tensor) -> None:
        prev = self._effective_grad
        self._effective_grad = grad.detach().clone() if prev is None else prev + grad.detach()

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", stats={self.stats}, unbiased={self.unbiased}, eps={self.eps}"
        if not self.center:
            text += f", center=False, input_mean={self.input_mean:.4f}"
        return text

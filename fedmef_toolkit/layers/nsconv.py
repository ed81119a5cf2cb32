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


def standardize_weight(
    weight: torch.Tensor,
    gain: torch.Tensor,
    mask: torch.Tensor | None = None,
    stats: str = "active",
    unbiased: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Return g * (w - mu) / sqrt(max(n * var, eps)) * m, per output channel.

    stats="active": mu and var over the active entries (the paper's form);
    stats="all": over all fan-in entries, zeros included, then masked (the
    authors' final research variant). `unbiased` uses n - 1 in the variance.
    """
    out_ch = weight.shape[0]
    w = weight.reshape(out_ch, -1)
    fan_in = w.shape[1]
    if mask is not None and stats == "active":
        m = mask.reshape(out_ch, -1).to(w.dtype)
        wm = w * m
        n = m.sum(dim=1, keepdim=True)
    else:
        m = None
        wm = w if mask is None else w * mask.reshape(out_ch, -1).to(w.dtype)
        n = torch.full((out_ch, 1), float(fan_in), dtype=w.dtype, device=w.device)
    n_safe = n.clamp_min(1.0)
    mu = wm.sum(dim=1, keepdim=True) / n_safe
    centered = w - mu
    if m is not None:
        centered = centered * m
    elif mask is not None:  # "all": statistics include zeros of pruned entries
        centered = wm - mu
    sq = (centered * centered).sum(dim=1, keepdim=True)  # = n * var (biased)
    if unbiased:
        sq = sq * n / (n - 1.0).clamp_min(1.0)
    w_hat = centered * torch.rsqrt(sq.clamp_min(eps)) * gain.reshape(out_ch, 1)
    if mask is not None:
        w_hat = w_hat * mask.reshape(out_ch, -1).to(w.dtype)
    return w_hat.reshape_as(weight)


class NSConv2d(nn.Conv2d):
    """Conv2d with a per-output-channel standardised weight and learned gain.

    A mask, when present, is the buffer `weight_mask` (attached by the
    pruning code); without one the layer is a dense weight-standardised conv.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, stats: str = "active", unbiased: bool = False, eps: float = 1e-4):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if stats not in ("active", "all"):
            raise ValueError(f"stats must be 'active' or 'all', got {stats!r}")
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.stats = stats
        self.unbiased = unbiased
        self.eps = eps
        self.sap = None  # set by fedmef_toolkit.sap.enable_sap

    def standardized_weight(self) -> torch.Tensor:
        mask = getattr(self, "weight_mask", None)
        return standardize_weight(self.weight, self.gain, mask, self.stats, self.unbiased, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.standardized_weight()
        if getattr(self, "capture_effective_grad", False) and w.requires_grad:
            w.register_hook(self._accumulate_effective_grad)
        if self.sap is not None and self.training and torch.is_grad_enabled():
            from ..sap.functions import sap_conv2d

            return sap_conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups, self.sap)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _accumulate_effective_grad(self, grad: torch.Tensor) -> None:
        # Growth needs dL/dw_hat (dense), not dL/dw (zero at pruned entries).
        prev = getattr(self, "_effective_grad", None)
        self._effective_grad = grad.detach().clone() if prev is None else prev + grad.detach()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stats={self.stats}, unbiased={self.unbiased}, eps={self.eps}"

"""How a model's conv + normalisation + activation units are built.

A `NormPolicy` is the single switch between the BatchNorm model (what the
baselines train) and the BN-free NSConv model (what FedMef trains); the
architectures ask it for units and never test the norm themselves.

The BN-free models follow the signal-propagation design of normalizer-free
ResNets (Brock, De and Smith, ICLR 2021): a residual block computes
``h + alpha * f(h / beta)`` where ``beta`` is the predicted standard deviation
of the residual stream ``h``. Every NSConv keeps the variance of its input
(zero-mean, unit-norm filters) and the scaled ReLU keeps unit variance, so
``f`` maps unit variance to unit variance and each block adds ``alpha**2`` to
the stream's variance; a transition block (one whose shortcut is a conv) feeds
its shortcut ``h / beta`` too, which resets the variance to ``1 + alpha**2``.
`SignalTracker` does this bookkeeping while an architecture is assembled.
"""

from __future__ import annotations

import math

import torch.nn as nn

from ..layers import NSConv2d, ScaledReLU
from ..layers.activations import RELU_GAIN

#: mean of the scaled ReLU's output for a unit-variance Gaussian input: gain / sqrt(2 pi)
SCALED_RELU_MEAN = RELU_GAIN / math.sqrt(2.0 * math.pi)

#: residual branch scale of the BN-free models (NF-ResNets use 0.2)
DEFAULT_ALPHA = 0.2


class NormPolicy:
    def __init__(self, norm: str = "bn", stats: str = "active", unbiased: bool = False, eps: float = 1e-4,
                 alpha: float = DEFAULT_ALPHA, center_depthwise: bool = False, center_head: bool = False):
        if norm not in ("bn", "nsconv"):
            raise ValueError(f"norm must be 'bn' or 'nsconv', got {norm!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.norm = norm
        self.alpha = alpha
        self.nsconv_kwargs = {"stats": stats, "unbiased": unbiased, "eps": eps}
        self.center_depthwise = center_depthwise
        self.center_head = center_head

    @property
    def normfree(self) -> bool:
        """BN-free model: pre-activation residual blocks ``h + alpha * f(h / beta)``."""
        return self.norm == "nsconv"

    @property
    def head_shift(self) -> float:
        """What the classifier subtracts from its (pooled, scaled-ReLU) input: the ReLU's
        expected mean when `center_head` is on in a BN-free model, else 0.

        Pooled scaled-ReLU features all have mean ~0.68, so every classifier gradient
        (p - y) x^T shares one large common-mode component; at learning rates the
        BN models take (0.1 and up) it throws the logits off within a few steps.
        BatchNorm's learned shift absorbs it; a fixed shift does the same here."""
        return SCALED_RELU_MEAN if self.normfree and self.center_head else 0.0

    def tracker(self) -> "SignalTracker":
        """Expected-variance bookkeeping for one network (alpha 1 and unused with BN)."""
        return SignalTracker(self.alpha if self.normfree else 1.0)

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        pad = k // 2
        if self.norm == "nsconv":
            return NSConv2d(cin, cout, k, stride, pad, groups=groups, bias=True, **self.nsconv_kwargs)
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout))

    def depthwise(self, channels: int, stride: int = 1) -> nn.Module:
        """A 3x3 depthwise conv whose input is a (scaled) ReLU's output.

        BN-free, a zero-mean 3x3 filter of one channel is a high-pass filter: it
        deletes each image's local mean, so whatever a block learns at low spatial
        frequency is lost (BatchNorm after a depthwise conv subtracts one mean per
        channel instead). So BN-free depthwise filters are standardised to unit
        norm without centring, and the ReLU's expected mean is taken off their
        input instead (`NSConv2d(input_mean=...)`, see `layers.nsconv.response_to_ones`).
        `center_depthwise=True` gives the plain NSConv of SPEC section 4.
        """
        if self.norm == "nsconv" and not self.center_depthwise:
            return NSConv2d(channels, channels, 3, stride, 1, groups=channels, bias=True, center=False,
                            input_mean=SCALED_RELU_MEAN, **self.nsconv_kwargs)
        return self.conv(channels, channels, 3, stride, groups=channels)

    def act(self, relu6: bool = False, input_scale: float = 1.0) -> nn.Module:
        """The activation; without BN a ReLU scaled to keep unit variance, whose input is
        first multiplied by `input_scale` (1 / beta at the entry of a residual branch).
        BN-free models have no ReLU6 clip: the clip would keep a second dense tensor for
        backward (its input) and 6 means nothing on a unit-variance signal."""
        if self.norm == "nsconv":
            return ScaledReLU(input_scale=input_scale)
        return nn.ReLU6(inplace=False) if relu6 else nn.ReLU(inplace=False)


class SignalTracker:
    """The predicted variance of a normalizer-free residual stream, block by block."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.var = 1.0

    @property
    def beta(self) -> float:
        """Predicted standard deviation of the stream at this point."""
        return math.sqrt(self.var)

    def block(self, transition: bool) -> float:
        """Enter a residual block; returns its beta and records the block's output variance.
        A transition block's shortcut sees ``h / beta`` too, so its output variance restarts."""
        beta = self.beta
        if transition:
            self.var = 1.0
        self.var += self.alpha ** 2
        return beta

    def plain(self) -> float:
        """Enter a block without residual connection (its output has unit variance)."""
        beta = self.beta
        self.var = 1.0
        return beta


def make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new

"""How a model's conv + normalisation + activation units are built.

A `NormPolicy` is the single switch between the BatchNorm model (what the
baselines train) and the BN-free NSConv model (what FedMef trains); the
architectures ask it for units and never test the norm themselves.
"""

from __future__ import annotations

import torch.nn as nn

from ..layers import NSConv2d, ScaledReLU


class NormPolicy:
    def __init__(self, norm: str = "bn", stats: str = "active", unbiased: bool = False, eps: float = 1e-4):
        if norm not in ("bn", "nsconv"):
            raise ValueError(f"norm must be 'bn' or 'nsconv', got {norm!r}")
        self.norm = norm
        self.nsconv_kwargs = {"stats": stats, "unbiased": unbiased, "eps": eps}

    @property
    def preactivation(self) -> bool:
        """BN-free residual blocks activate before the branch (as NF-ResNets do): an
        activation after the residual sum would shift the mean and grow the
        variance block after block without BN to undo it."""
        return self.norm == "nsconv"

    @property
    def residual_scale(self) -> float:
        """Factor on a residual sum. 1 for both norms: without BN the branch starts at
        zero (SkipInit, see residual_out), so the stream keeps unit variance at init."""
        return 1.0

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        pad = k // 2
        if self.norm == "nsconv":
            return NSConv2d(cin, cout, k, stride, pad, groups=groups, bias=True, **self.nsconv_kwargs)
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout))

    def residual_out(self, conv: nn.Module) -> nn.Module:
        """The last conv of a residual branch. Without BN it starts with gain 0 (SkipInit),
        so every block is the identity at initialisation; measured on CIFAR-10, the
        BN-free ResNet18 and MobileNetV2 otherwise diverge within a few dozen SGD
        steps at lr 0.02, momentum 0.9, batch 8."""
        if self.norm == "nsconv":
            nn.init.zeros_(conv.gain)
        return conv

    def act(self, relu6: bool = False) -> nn.Module:
        if self.norm == "nsconv":
            return ScaledReLU()
        return nn.ReLU6(inplace=False) if relu6 else nn.ReLU(inplace=False)


def make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new

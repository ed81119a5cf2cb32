"""Layers, one concept per file."""

from .activations import ScaledReLU
from .nsconv import NSConv2d, standardize_weight

__all__ = ["NSConv2d", "ScaledReLU", "standardize_weight"]

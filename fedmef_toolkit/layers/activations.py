"""Activations for BN-free networks.

ScaledReLU multiplies ReLU by a gain so that, for a standard normal input,
the output has unit variance: gain = sqrt(2 / (1 - 1/pi)) ~= 1.7139
(normalizer-free networks). With `save_mask=True` (turned on with SAP) it keeps
a 1-bit sign mask for backward instead of its dense output, so no dense copy
of the next layer's input stays alive.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


class ScaledReLU(nn.Module):
    def __init__(self, gain: float = RELU_GAIN, max_value: float | None = None):
        super().__init__()
        self.gain = gain
        self.max_value = max_value  # ReLU6-style clip (before the gain)
        self.save_mask = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.save_mask and self.training and torch.is_grad_enabled():
            from ..sap.functions import masked_relu

            return masked_relu(x, self.gain, self.max_value)
        # Scale first: relu(g*x) = g*relu(x) for g > 0, and then the tensor ReLU saves for
        # backward is its output, the very tensor the next layer saves (no second copy).
        if self.gain != 1.0:
            x = x * self.gain
        if self.max_value is None:
            return torch.relu(x)
        return torch.clamp(x, 0.0, self.max_value * self.gain)

    def extra_repr(self) -> str:
        return f"gain={self.gain:.4f}" + (f", max_value={self.max_value}" if self.max_value is not None else "")

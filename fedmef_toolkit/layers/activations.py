"""Activations for BN-free networks.

ScaledReLU multiplies ReLU by a gain so that, for a standard normal input,
the output has unit variance: gain = sqrt(2 / (1 - 1/pi)) ~= 1.7139
(normalizer-free networks). `input_scale` multiplies the input first
(relu(s x) = s relu(x) for s > 0, so it costs nothing): normalizer-free
residual blocks use it to divide the residual stream by its expected std.
With `save_mask=True` (turned on with SAP) it keeps
a 1-bit sign mask for backward instead of its dense output, so no dense copy
of the next layer's input stays alive.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


class ScaledReLU(nn.Module):
    def __init__(self, gain: float = RELU_GAIN, max_value: float | None = None, input_scale: float = 1.0):
        super().__init__()
        if not input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        self.gain = gain
        self.max_value = max_value  # ReLU6-style clip (of the scaled input, before the gain)
        self.input_scale = input_scale
        self.save_mask = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gain * clamp(s x, 0, max) = clamp(g' x, 0, max' g') with g' = gain s, max' = max / s
        gain = self.gain * self.input_scale
        max_value = None if self.max_value is None else self.max_value / self.input_scale
        if self.save_mask and self.training and torch.is_grad_enabled():
            from ..sap.functions import masked_relu

            return masked_relu(x, gain, max_value)
        # Scale first: relu(g*x) = g*relu(x) for g > 0, and then the tensor ReLU saves for
        # backward is its output, the very tensor the next layer saves (no second copy).
        if gain != 1.0:
            x = x * gain
        if max_value is None:
            return torch.relu(x)
        return torch.clamp(x, 0.0, max_value * gain)

    def extra_repr(self) -> str:
        text = f"gain={self.gain:.4f}"
        if self.input_scale != 1.0:
            text += f", input_scale={self.input_scale:.4f}"
        return text + (f", max_value={self.max_value}" if self.max_value is not None else "")

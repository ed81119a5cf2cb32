"""A four-conv network for quick experiments, tests and the quickstart."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import NormPolicy


class CNN4(nn.Module):
    def __init__(self, *, num_classes: int = 10, width: float = 1.0, image_size: int = 32, policy: NormPolicy | None = None):
        super().__init__()
        policy = policy or NormPolicy()
        c = [max(4, int(round(x * width))) for x in (32, 64, 128, 128)]
        self.features = nn.Sequential(
            policy.conv(3, c[0], 3, 1), policy.act(),
            policy.conv(c[0], c[1], 3, 2), policy.act(),
            policy.conv(c[1], c[2], 3, 2), policy.act(),
            policy.conv(c[2], c[3], 3, 2), policy.act(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[3], num_classes)
        self.head_shift = policy.head_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(x - self.head_shift if self.head_shift else x)

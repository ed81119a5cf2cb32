"""MobileNetV2 with CIFAR strides (stride-1 stem, stride 1 in the second stage)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import NormPolicy, make_divisible

# (expansion, out channels, blocks, first stride) as in the usual CIFAR variant
CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int, policy: NormPolicy):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [policy.conv(cin, hidden, 1), policy.act(relu6=True)]
        self.use_residual = stride == 1 and cin == cout
        project = policy.conv(hidden, cout, 1)
        if self.use_residual:
            project = policy.residual_out(project)
        layers += [policy.conv(hidden, hidden, 3, stride, groups=hidden), policy.act(relu6=True), project]
        self.block = nn.Sequential(*layers)
        self.scale = policy.residual_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = out + x
            if self.scale != 1.0:
                out = out * self.scale
        return out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32, policy: NormPolicy | None = None):
        super().__init__()
        policy = policy or NormPolicy()
        stem_stride = 1 if image_size <= 32 else 2
        cin = make_divisible(32 * width)
        self.stem = nn.Sequential(policy.conv(3, cin, 3, stem_stride), policy.act(relu6=True))
        blocks = []
        for t, c, n, s in CIFAR_CFG:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, policy))
                cin = cout
        self.features = nn.Sequential(*blocks)
        last = make_divisible(1280 * max(1.0, width))
        self.head = nn.Sequential(policy.conv(cin, last, 1), policy.act(relu6=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))

"""CIFAR-style ResNet18: 3x3 stride-1 stem, no max-pool, widths 64-128-256-512."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import NormPolicy


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, policy: NormPolicy):
        super().__init__()
        self.conv1 = policy.conv(cin, cout, 3, stride)
        self.act1 = policy.act()
        self.conv2 = policy.residual_out(policy.conv(cout, cout, 3, 1))
        self.shortcut = policy.conv(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act2 = policy.act()
        self.scale = policy.residual_scale
        self.preact = policy.preactivation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:  # x + branch(act(x)), rescaled: the residual stream stays linear
            h = self.act1(x)
            out = self.conv2(self.act2(self.conv1(h)))
            skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(h)
            return (out + skip) * self.scale
        out = self.conv2(self.act1(self.conv1(x)))
        out = out + self.shortcut(x)
        if self.scale != 1.0:
            out = out * self.scale
        return self.act2(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, image_size: int = 32, policy: NormPolicy | None = None):
        super().__init__()
        policy = policy or NormPolicy()
        widths = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        stem_stride = 1 if image_size <= 32 else 2  # 64x64 inputs: halve once so stages see 32x32
        self.stem = policy.conv(3, widths[0], 3, stem_stride)
        # pre-activation blocks apply the activation themselves, and once more at the end
        self.stem_act = nn.Identity() if policy.preactivation else policy.act()
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride, policy), BasicBlock(cout, cout, 1, policy)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.final_act = policy.act() if policy.preactivation else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem(x))
        x = self.final_act(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))

"""MobileNetV2 with CIFAR strides (stride-1 stem, stride 1 in the second stage).

With BatchNorm, the usual inverted residuals ``h + f(h)``. Without (NSConv),
normalizer-free ones (see blocks.py): a residual block computes
``h + alpha * f(h / beta)`` and a block without residual ``f(h / beta)``; the
division by beta is folded into the block's first activation (its first conv
is linear and keeps the variance of its input).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import NormPolicy, SignalTracker, make_divisible

# (expansion, out channels, blocks, first stride) as in the usual CIFAR variant
CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int, policy: NormPolicy,
                 tracker: SignalTracker):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        beta = tracker.block(transition=False) if self.use_residual else tracker.plain()
        self.predicted_var = tracker.var  # of the block's output at initialisation (BN-free)
        first = 1.0 / beta if policy.normfree else 1.0  # input scale of the block's first activation
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [policy.conv(cin, hidden, 1), policy.act(relu6=True, input_scale=first)]
            first = 1.0
        layers += [policy.depthwise(hidden, stride), policy.act(relu6=True, input_scale=first),
                   policy.conv(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.alpha = tracker.alpha if self.use_residual else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            return x.add(out, alpha=self.alpha)
        return out


class MobileNetV2(nn.Module):
    def __init__(self, *, num_classes: int = 10, width: float = 1.0, image_size: int = 32,
                 policy: NormPolicy | None = None):
        super().__init__()
        policy = policy or NormPolicy()
        stem_stride = 1 if image_size <= 32 else 2
        cin = make_divisible(32 * width)
        self.stem = nn.Sequential(policy.conv(3, cin, 3, stem_stride), policy.act(relu6=True))
        tracker = policy.tracker()
        blocks = []
        for t, c, n, s in CIFAR_CFG:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, policy, tracker))
                cin = cout
        self.features = nn.Sequential(*blocks)
        last = make_divisible(1280 * max(1.0, width))
        head_scale = 1.0 / tracker.beta if policy.normfree else 1.0
        self.head = nn.Sequential(policy.conv(cin, last, 1), policy.act(relu6=True, input_scale=head_scale))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        self.head_shift = policy.head_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x - self.head_shift if self.head_shift else x)

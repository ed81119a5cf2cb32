"""CIFAR-style ResNets: 3x3 stride-1 stem, no max-pool, basic blocks.

`ResNet18`: widths 64-128-256-512, two blocks per stage (~11M parameters, the
paper's model). `NarrowResNet`: the FedMef authors' CIFAR model (their
library calls it ResNet18): widths 16-32-64, three stages of two blocks
(~0.18M parameters), for comparisons with their numbers.

With BatchNorm, blocks are the usual post-activation ``relu(h + f(h))``.
Without (NSConv), they are normalizer-free pre-activation blocks
``h + alpha * f(h / beta)`` (see blocks.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import NormPolicy, SignalTracker


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, policy: NormPolicy, tracker: SignalTracker):
        super().__init__()
        transition = stride != 1 or cin != cout
        beta = tracker.block(transition)
        self.predicted_var = tracker.var  # of the block's output at initialisation (BN-free)
        self.normfree = policy.normfree
        self.alpha = tracker.alpha
        # BN: conv1 -> act1 -> conv2 (+ shortcut) -> act2.  BN-free: act1(x / beta) -> conv1 -> act2 -> conv2.
        self.act1 = policy.act(input_scale=1.0 / beta) if self.normfree else policy.act()
        self.conv1 = policy.conv(cin, cout, 3, stride)
        self.act2 = policy.act()
        self.conv2 = policy.conv(cout, cout, 3, 1)
        self.shortcut = policy.conv(cin, cout, 1, stride) if transition else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normfree:
            h = self.act1(x)
            skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(h)
            return skip.add(self.conv2(self.act2(self.conv1(h))), alpha=self.alpha)
        out = self.conv2(self.act1(self.conv1(x)))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet of basic blocks: `widths[i]` channels and `depths[i]` blocks in stage i."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10, image_size: int = 32,
                 policy: NormPolicy | None = None):
        super().__init__()
        policy = policy or NormPolicy()
        stem_stride = 1 if image_size <= 32 else 2  # 64x64 inputs: halve once so stages see 32x32
        self.stem = policy.conv(3, widths[0], 3, stem_stride)
        # BN-free blocks activate their input themselves, and the stream is activated once at the end
        self.stem_act = nn.Identity() if policy.normfree else policy.act()
        tracker = policy.tracker()
        self.num_stages, cin = len(widths), widths[0]
        for i, (cout, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, policy, tracker))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))  # torchvision's names
        self.final_act = policy.act(input_scale=1.0 / tracker.beta) if policy.normfree else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.head_shift = policy.head_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.pool(self.final_act(x)), 1)
        return self.fc(x - self.head_shift if self.head_shift else x)


def _widths(base: tuple[int, ...], width: float) -> tuple[int, ...]:
    return tuple(max(8, int(round(c * width))) for c in base)


def ResNet18(*, num_classes: int = 10, width: float = 1.0, image_size: int = 32,
             policy: NormPolicy | None = None) -> ResNet:
    return ResNet(_widths((64, 128, 256, 512), width), (2, 2, 2, 2), num_classes, image_size, policy)


def NarrowResNet(*, num_classes: int = 10, width: float = 1.0, image_size: int = 32,
                 policy: NormPolicy | None = None) -> ResNet:
    return ResNet(_widths((16, 32, 64), width), (2, 2, 2), num_classes, image_size, policy)

"""Batched data augmentation on the training device.

Images stay uint8 on the device; a batch is cropped (zero padding 4,
random offset), flipped and normalised in a few tensor ops, with no per-image
Python work and no host round trip.
"""

from __future__ import annotations

import torch


class DeviceAugment:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, pad: int = 4, flip: bool = True, enabled: bool = True):
        self.mean = mean.view(1, -1, 1, 1)
        self.std = std.view(1, -1, 1, 1)
        self.pad = pad
        self.flip = flip
        self.enabled = enabled

    def to(self, device) -> "DeviceAugment":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float() / 255.0 - self.mean) / self.std

    def train(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = self.normalize(x_uint8)
        if not self.enabled:
            return x
        b, c, h, w = x.shape
        dev = x.device
        if self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b, 1), generator=gen, device=gen.device).to(dev)
            ox = torch.randint(0, 2 * p + 1, (b, 1), generator=gen, device=gen.device).to(dev)
            rows = (oy + torch.arange(h, device=dev)).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
            x = padded.gather(2, rows)
            cols = (ox + torch.arange(w, device=dev)).view(b, 1, 1, w).expand(b, c, h, w)
            x = x.gather(3, cols)
        if self.flip:
            flip = torch.rand(b, generator=gen, device=gen.device).to(dev) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return x

"""A built-in synthetic image data set that small models can learn.

Each class is a smooth random colour pattern (a sum of a few low-frequency
sinusoids). A sample is its class pattern, randomly shifted by up to an
eighth of the image, scaled in brightness and covered in pixel noise, so the
task needs translation-tolerant features (what convolutions are for) and is
not solvable from a single pixel. Fully determined by the seed.
"""

from __future__ import annotations

import math

import torch


def _class_patterns(num_classes: int, size: int, gen: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patterns = torch.zeros(num_classes, 3, size, size)
    for c in range(num_classes):
        for _ in range(4):
            fy, fx = torch.randint(1, 4, (2,), generator=gen).tolist()
            phase = torch.rand(3, generator=gen) * 2 * math.pi
            amp = torch.rand(3, generator=gen) * 0.5 + 0.5
            wave = torch.sin(2 * math.pi * (fy * yy + fx * xx) / size + phase[:, None, None])
            patterns[c] += amp[:, None, None] * wave
    patterns /= patterns.flatten(1).std(dim=1)[:, None, None, None]
    return patterns


def make_synthetic(num_samples: int, num_classes: int, image_size: int, noise: float, seed: int):
    """Return (images uint8 [N,3,H,W], labels int64 [N]) with balanced classes."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    patterns = _class_patterns(num_classes, image_size, gen)
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    max_shift = max(1, image_size // 8)
    shifts = torch.randint(-max_shift, max_shift + 1, (num_samples, 2), generator=gen)
    images = torch.empty(num_samples, 3, image_size, image_size)
    for i in range(num_samples):
        dy, dx = shifts[i].tolist()
        images[i] = torch.roll(patterns[labels[i]], shifts=(dy, dx), dims=(1, 2))
    brightness = torch.rand(num_samples, 1, 1, 1, generator=gen) * 0.6 + 0.7
    images = images * brightness + noise * 2.0 * torch.randn(images.shape, generator=gen)
    images = (images * 40 + 128).clamp(0, 255).round().to(torch.uint8)
    return images, labels

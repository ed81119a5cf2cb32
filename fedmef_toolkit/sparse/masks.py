"""Binary masks on prunable tensors.

Prunable tensors are the weights of conv and linear layers (NSConv included);
biases, gains and norm parameters stay dense. A layer's mask is the bool
buffer `weight_mask` on its module, so masks travel with the model's
state_dict (checkpoints, client payloads, exports) without a side channel.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .densities import layer_densities

MASK_SUFFIX = "weight_mask"


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and linear modules in definition order, keyed by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in prunable_modules(model).items()}


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_mask for n, m in prunable_modules(model).items() if getattr(m, MASK_SUFFIX, None) is not None}


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Register (or replace) each module's mask buffer and zero its pruned weights."""
    modules = prunable_modules(model)
    for name, mask in masks.items():
        mod = modules[name]
        mask = mask.to(device=mod.weight.device, dtype=torch.bool)
        if getattr(mod, MASK_SUFFIX, None) is None:
            mod.register_buffer(MASK_SUFFIX, mask)
        else:
            mod.weight_mask.copy_(mask)
    apply_masks(model)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for mod in prunable_modules(model).values():
        mask = getattr(mod, MASK_SUFFIX, None)
        if mask is not None:
            mod.weight.mul_(mask)


def random_mask(shape, k: int, gen: torch.Generator) -> torch.Tensor:
    numel = int(torch.Size(shape).numel())
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[:k]] = True
    return mask.view(shape)


def magnitude_mask(weight: torch.Tensor, k: int) -> torch.Tensor:
    flat = weight.detach().abs().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(weight)


def layer_counts(model: nn.Module, density: float, distribution: str) -> dict[str, int]:
    """Active entries per layer at `density`: round(density_l * size_l), at least 1."""
    shapes = weight_shapes(model)
    dens = layer_densities(shapes, density, distribution)
    counts = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        counts[name] = max(1, min(numel, round(dens[name] * numel)))
    return counts


def init_masks(model: nn.Module, density: float, distribution: str, init: str, seed: int) -> dict[str, torch.Tensor]:
    """Initial masks with exactly round(density_l * size_l) active entries per layer."""
    counts = layer_counts(model, density, distribution)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, mod in prunable_modules(model).items():
        k = counts[name]
        masks[name] = random_mask(mod.weight.shape, k, gen) if init == "random" else magnitude_mask(mod.weight.cpu(), k)
    return masks


def mask_density(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(1, total)

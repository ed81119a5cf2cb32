"""Server-side aggregation math."""

from __future__ import annotations

import torch

from ..sparse.masks import MASK_SUFFIX


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted FedAvg of floating tensors; integer buffers take the max
    (BatchNorm's num_batches_tracked), masks are left to the strategy."""
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        if key.endswith(MASK_SUFFIX):
            continue
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float32)
            for state, w in zip(states, weights):
                acc.add_(state[key].float(), alpha=w / total)
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).max(dim=0).values
    return out


def masked_average(values: list[torch.Tensor], masks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Per entry, the weighted mean over the clients whose mask holds it (FedDST); 0 where none does."""
    num = torch.zeros_like(values[0], dtype=torch.float32)
    den = torch.zeros_like(values[0], dtype=torch.float32)
    for v, m, w in zip(values, masks, weights):
        mf = m.to(torch.float32)
        num.add_(v.float() * mf, alpha=w)
        den.add_(mf, alpha=w)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)).to(values[0].dtype)

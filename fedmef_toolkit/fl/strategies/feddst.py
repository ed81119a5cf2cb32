"""FedDST (Bibikar et al., AAAI 2022): clients adjust their own masks.

In adjustment rounds each client, halfway through its local training,
prunes its k_l smallest active weights and grows the k_l inactive entries
with the largest local gradient, then keeps training. The server averages
each entry over the clients whose masks hold it and keeps, per layer, the
nnz_l entries of largest aggregated magnitude, so the density is unchanged.
"""

from __future__ import annotations

import torch

from ...sparse.adjust import prune_and_grow, smallest_active
from ...sparse.masks import MASK_SUFFIX, get_masks, prunable_modules
from ...sparse.schedules import adjustment_fraction, is_adjustment_round, swap_count
from ..aggregate import masked_average
from ..plan import ClientPlan
from .registry import register_method
from .sparse import StaticSparse


class LocalAdjustPlan(ClientPlan):
    def __init__(self, lr: float, fraction: float, full_grad: bool):
        super().__init__(lr)
        self.fraction, self.full_grad = fraction, full_grad

    def begin(self, model, total_steps):
        self.adjust_at = total_steps // 2

    def at_step(self, step, model, trainer, client, gen):
        if step != self.adjust_at:
            return
        grads = trainer.effective_weight_grads(model, client, gen, self.full_grad)
        mods = prunable_modules(model)
        with torch.no_grad():
            for name, mask in get_masks(model).items():
                if bool(mask.all()):
                    continue
                low = smallest_active(mods[name].weight, mask, swap_count(self.fraction, int(mask.sum())))
                new_mask, _ = prune_and_grow(mask, low, grads[name])
                mods[name].weight_mask.copy_(new_mask)
                mods[name].weight.mul_(new_mask)  # grown entries were inactive, so they start at 0


@register_method("feddst")
class FedDST(StaticSparse):
    """FedDST (Bibikar et al., AAAI 2022): clients adjust their own masks, the server merges them."""

    dynamic = True

    def client_plan(self, t, lr, model):
        sp = self.recipe.method.sparsity
        if is_adjustment_round(t, sp.delta_t, sp.t_end):
            return LocalAdjustPlan(lr, adjustment_fraction(t, sp.alpha, sp.t_end), sp.grow_grad == "full")
        return ClientPlan(lr)

    def aggregate(self, model, results, t):
        super().aggregate(model, results, t)  # dense tensors; masks untouched
        weights = [r.num_samples for r in results]
        mods = prunable_modules(model)
        with torch.no_grad():
            for name, gmask in get_masks(model).items():
                key = f"{name}.weight"
                masks = [r.state[f"{name}.{MASK_SUFFIX}"] for r in results]
                avg = masked_average([r.state[key] for r in results], masks, weights)
                union = torch.stack(masks).any(dim=0)
                nnz = int(gmask.sum())
                score = avg.abs().float().masked_fill(~union, -1.0).flatten()
                new_mask = torch.zeros_like(gmask).flatten()
                new_mask[torch.topk(score, nnz, sorted=False).indices] = True
                new_mask = new_mask.view_as(gmask)
                gmask.copy_(new_mask)
                mods[name].weight.copy_(avg * new_mask)

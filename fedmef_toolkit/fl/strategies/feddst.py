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
    """Halfway through local training, prune each adjusted layer's k smallest active weights
    and grow as many inactive entries with the largest local gradient. `swaps`: layer -> k,
    from the global masks (the server's count), so the client never waits for the GPU."""

    def __init__(self, lr: float, swaps: dict[str, int], full_grad: bool):
        super().__init__(lr)
        self.swaps, self.full_grad = swaps, full_grad

    def begin(self, model, total_steps):
        self.adjust_at = total_steps // 2

    def at_step(self, step, model, trainer, client, gen):
        if step != self.adjust_at:
            return
        grads = trainer.effective_weight_grads(model, client, gen, self.full_grad)
        mods, masks = prunable_modules(model), get_masks(model)
        with torch.no_grad():
            for name, k in self.swaps.items():
                mask = masks[name]
                low = smallest_active(mods[name].weight, mask, k)
                new_mask, _ = prune_and_grow(mask, low, grads[name], k)
                mods[name].weight_mask.copy_(new_mask)
                mods[name].weight.mul_(new_mask)  # grown entries were inactive, so they start at 0


@register_method("feddst")
class FedDST(StaticSparse):
    """FedDST (Bibikar et al., AAAI 2022): clients adjust their own masks, the server merges them."""

    dynamic = True

    def __init__(self, recipe):
        super().__init__(recipe)
        self._swaps: tuple[int, dict[str, int]] | None = None  # (round, layer -> k) of an adjustment round

    def begin_round(self, t, model):
        sp = self.recipe.method.sparsity
        self._swaps = None
        if is_adjustment_round(t, sp.delta_t, sp.t_end):
            self._swaps_for(t, model)  # counted here, between rounds: client plans then need no host sync
        return {}

    def _swaps_for(self, t: int, model) -> dict[str, int]:
        """Layer -> entries each client swaps in adjustment round t (dense layers are not adjusted)."""
        if self._swaps is None or self._swaps[0] != t:
            sp = self.recipe.method.sparsity
            frac = adjustment_fraction(t, sp.alpha, sp.t_end)
            self._swaps = (t, {name: swap_count(frac, int(mask.sum())) for name, mask in get_masks(model).items()
                               if not bool(mask.all())})
        return self._swaps[1]

    def client_plan(self, t, lr, model):
        sp = self.recipe.method.sparsity
        if is_adjustment_round(t, sp.delta_t, sp.t_end):
            return LocalAdjustPlan(lr, self._swaps_for(t, model), sp.grow_grad == "full")
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

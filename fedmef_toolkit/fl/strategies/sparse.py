"""Static sparse FedAvg: a fixed random ERK mask, the baseline every dynamic method adjusts."""

from __future__ import annotations

import torch.nn as nn

from ...sparse.masks import apply_masks, attach_masks, init_masks
from .fedavg import FedAvg
from .registry import register_method


@register_method("fedavg_sparse")
class StaticSparse(FedAvg):
    """FedAvg on a fixed sparse model (random ERK mask at method.sparsity.density)."""

    sparse = True

    def setup(self, model: nn.Module, seed: int) -> None:
        sp = self.recipe.method.sparsity
        attach_masks(model, init_masks(model, sp.density, sp.distribution, sp.init, seed))

    def aggregate(self, model, results, t):
        super().aggregate(model, results, t)
        apply_masks(model)

"""PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices", TNNLS 2022).

Two stages:

1. Initial pruning on one client's data (`prepare`, before round 1): the
   chosen client trains the dense model for `init_rounds` local passes at a
   time; after each such pass the server takes, per layer, the largest-|w|
   entries at the ERK counts of the target density. It stops once fewer than
   `init_tol` of the active entries changed since the previous pass (the mask
   has stabilised) or after `init_max_iters` passes, and keeps the client's
   weights under that mask.
2. Adaptive pruning during FL: every sampled client sends, per layer, the
   squared gradient of its local loss (all entries); the server accumulates
   these, sample-weighted, over the rounds since the last adjustment (the
   importance). In adjustment rounds it removes the k_l active entries of
   smallest |w| and adds the k_l inactive entries of largest importance, so
   the per-layer counts never change.

Departures from the paper (docs/methods.md): no per-device timing model
(the paper picks the model size that minimises estimated round time; here the
density is the recipe's, the same for every method); importance comes from
one post-training gradient per client and round (`method.sparsity.grow_grad`)
rather than from every local SGD iteration, since the shared trainer masks
gradients in its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...errors import UserError
from ...fields import spec_field
from ...sparse.adjust import largest_inactive, smallest_active
from ...sparse.masks import attach_masks, get_masks, init_masks, prunable_modules
from ...sparse.schedules import adjustment_fraction, is_adjustment_round, swap_count
from ..comm import state_bytes
from ..plan import ClientPlan
from .registry import register_method
from .sparse import StaticSparse


@dataclass
class PruneFLSpec:
    """Recipe section `method.prunefl`."""

    init_client: int = spec_field(0, lo=0, hi=1_000_000, help="client whose data the initial pruning uses")
    init_rounds: int = spec_field(1, lo=1, hi=10_000,
                                  help="local training passes (fl.local_epochs each) of the initial client between "
                                       "mask updates")
    init_max_iters: int = spec_field(10, lo=1, hi=10_000, help="most passes of initial pruning")
    init_tol: float = spec_field(0.05, lo=0.0, hi=1.0,
                                 help="initial pruning stops once this fraction of active entries or fewer changed")
    delta_t: int | None = spec_field(None, lo=1, hi=1_000_000,
                                     help="rounds between adjustments (null: method.sparsity.delta_t)")
    fraction: float | None = spec_field(None, lo=0.0, hi=1.0,
                                        help="fixed fraction of each layer's active entries swapped per adjustment "
                                             "(null: method.sparsity.alpha, cosine-annealed)")


def mask_change(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """Fraction of active entries that moved between two masks of equal per-layer counts."""
    moved = sum(int((new[n] & ~old[n]).sum()) for n in new)
    return moved / max(1, sum(int(m.sum()) for m in new.values()))


def accumulate_importance(acc: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
                          weights: list[float]) -> dict[str, torch.Tensor]:
    """acc + sum_k w_k * g_k^2 over this round's clients (uploads: per-layer squared gradients;
    weights: sample counts, normalised here). Returns a new dict; `acc` is not changed."""
    total = float(sum(weights))
    out = {n: a.clone() for n, a in acc.items()}
    for sq, w in zip(uploads, weights):
        for n, g2 in sq.items():
            term = g2.float() * (w / total)
            out[n] = out[n] + term.to(out[n].device) if n in out else term
    return out


def importance_swap(weight: torch.Tensor, mask: torch.Tensor, importance: torch.Tensor, k: int):
    """PruneFL's adjustment of one layer: drop the k active entries of smallest |w|, add the k
    inactive-after-the-drop entries of largest accumulated importance. Returns (new mask, grown)."""
    kept = mask & ~smallest_active(weight, mask, k)
    grown = largest_inactive(importance, ~kept, k)
    return kept | grown, grown


class SquaredGradPlan(ClientPlan):
    """After local training, send the squared dense gradient of each adjustable layer."""

    def __init__(self, lr: float, layers: list[str], full_grad: bool):
        super().__init__(lr)
        self.layers, self.full_grad = layers, full_grad

    def finish(self, model, trainer, client, gen) -> dict:
        grads = trainer.effective_weight_grads(model, client, gen, self.full_grad)
        return {"sqgrad": {n: grads[n].square() for n in self.layers}}


@register_method("prunefl", spec=PruneFLSpec)
class PruneFL(StaticSparse):
    """PruneFL (Jiang et al., TNNLS 2022): initial pruning on one client, then importance-guided swaps."""

    dynamic = True

    def __init__(self, recipe):
        super().__init__(recipe)
        self.importance: dict[str, torch.Tensor] = {}
        self._layers: tuple[int, list[str]] | None = None  # (round, adjustable layers) of a collecting round

    @property
    def spec(self) -> PruneFLSpec:
        return self.recipe.method.prunefl

    @property
    def delta_t(self) -> int:
        return self.spec.delta_t or self.recipe.method.sparsity.delta_t

    def setup(self, model: nn.Module, seed: int) -> None:
        # dense masks until the initial pruning (prepare) chooses the sparse one
        attach_masks(model, {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_modules(model).items()})

    # -- stage 1: initial pruning on one client --------------------------------
    def prepare(self, model, ctx):
        spec, sp = self.spec, self.recipe.method.sparsity
        if spec.init_client >= ctx.num_clients:
            raise UserError(f"method.prunefl.init_client ({spec.init_client}) must be < data.num_clients "
                            f"({ctx.num_clients})")
        mask, change, passes, up, down = None, 1.0, 0, 0, 0
        for i in range(spec.init_max_iters):
            passes = i + 1
            for j in range(spec.init_rounds):
                down += state_bytes(model.state_dict())
                result, = ctx.run_clients(-(i * spec.init_rounds + j + 1), model, [spec.init_client], lambda: ClientPlan(ctx.lr))
                model.load_state_dict(result.state)
                up += state_bytes(result.state)
            new = init_masks(model, sp.density, sp.distribution, "magnitude", ctx.seed)
            change = 1.0 if mask is None else mask_change(mask, new)
            mask = new
            if change <= spec.init_tol:
                break
        attach_masks(model, mask)  # pruned weights become exactly 0
        return {"init_passes": passes, "init_mask_change": change, "bytes_up": up, "bytes_down": down}

    # -- stage 2: adaptive pruning -----------------------------------------------
    def _adjustable(self, model) -> list[str]:
        return [n for n, m in get_masks(model).items() if not bool(m.all())]

    def _collecting(self, t: int) -> bool:
        """Clients send squared gradients while an adjustment is still ahead."""
        return t <= self.recipe.method.sparsity.t_end

    def begin_round(self, t, model):
        self._layers = None
        if self._collecting(t):
            self._layers_for(t, model)  # read here, between rounds: client plans then need no host sync
        return {}

    def _layers_for(self, t: int, model) -> list[str]:
        if self._layers is None or self._layers[0] != t:
            self._layers = (t, self._adjustable(model))
        return self._layers[1]

    def client_plan(self, t, lr, model):
        if not self._collecting(t):
            return ClientPlan(lr)
        return SquaredGradPlan(lr, self._layers_for(t, model), self.recipe.method.sparsity.grow_grad == "full")

    def aggregate(self, model, results, t):
        super().aggregate(model, results, t)
        sq = [r.upload["sqgrad"] for r in results if "sqgrad" in r.upload]
        if sq:
            self.importance = accumulate_importance(self.importance, sq, [r.num_samples for r in results])

    def upload_bytes(self, result):
        sq = result.upload.get("sqgrad", {})
        return state_bytes(result.state) + sum(g.numel() * 4 for g in sq.values())  # dense float32

    def end_round(self, t, model, results, evaluate):
        sp = self.recipe.method.sparsity
        if not is_adjustment_round(t, self.delta_t, sp.t_end) or not self.importance:
            return {}
        frac = self.spec.fraction if self.spec.fraction is not None else adjustment_fraction(t, sp.alpha, sp.t_end)
        acc_before, _ = evaluate(model)
        mods = prunable_modules(model)
        swapped = 0
        with torch.no_grad():
            for name, mask in get_masks(model).items():
                if name not in self.importance or bool(mask.all()):
                    continue
                k = swap_count(frac, int(mask.sum()))
                new_mask, grown = importance_swap(mods[name].weight, mask, self.importance[name], k)
                mods[name].weight_mask.copy_(new_mask)
                mods[name].weight.mul_(new_mask)
                mods[name].weight.masked_fill_(grown, 0.0)  # grown entries start at exactly 0
                swapped += k
        acc_after, _ = evaluate(model)
        self.importance = {}  # accumulate afresh until the next adjustment
        return {"adjusted": True, "swapped": swapped, "acc_before_adjust": acc_before, "acc_after_adjust": acc_after}

    # -- checkpointing ------------------------------------------------------------
    def state_tensors(self):
        return {f"importance.{n}": v for n, v in self.importance.items()}

    def load_state_tensors(self, tensors):
        self.importance = {k[len("importance."):]: v.float() for k, v in tensors.items() if k.startswith("importance.")}

"""FedMef: server-side dynamic pruning with budget-aware extrusion (SPEC 2-3).

Every DeltaT rounds up to T_end the server prunes, per layer, the k_l
smallest active weights (theta_low) and grows the k_l inactive entries with
the largest aggregated client gradient. theta_low is computed at the start
of the round that ends with the adjustment and sent with the model, so
clients can (a) extrude it with BaE and (b) include it among the candidates
of their sparse gradient upload. With `bae.enabled: false` the same server
adjustment runs without extrusion (the "FedMef w/o BaE" ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...fields import spec_field
from ...layers import layout

from ...sparse.adjust import prune_and_grow, smallest_active, sum_messages, topk_message
from ...sparse.masks import get_masks, prunable_modules
from ...sparse.schedules import (adjustment_fraction, bae_step_size, is_extrusion_round, next_adjustment_round,
                                 swap_count)
from ..comm import mask_bytes, message_bytes, state_bytes
from ..plan import ClientPlan, MaskedWeightPenalty
from .registry import register_method
from .sparse import StaticSparse


@dataclass
class BaESpec:
    """Recipe section `method.bae`: budget-aware extrusion (SPEC 3)."""

    enabled: bool = spec_field(True)
    rounds: int = spec_field(1, lo=1, hi=1_000_000, help="rounds ending with an adjustment round that run extrusion")
    lam: float = spec_field(0.01, lo=0.0, hi=1e6)
    penalty: str = spec_field("l2sq", choices=["l2sq", "l2"],
                              help="lambda*||theta_low||^2 (paper) or unsquared (authors' code)")
    sigmoid_norm: str = spec_field("l2", choices=["l2", "l1"])
    max_lr: float | None = spec_field(None, lo=0.0, lo_open=True, hi=100.0)
    psi: float = spec_field(1.0, lo=0.0, hi=1e6)


def growth_upload_bytes(result) -> int:
    """A client's sparse model plus its top-k gradient message (FedMef, FedTiny)."""
    return state_bytes(result.state) + message_bytes(result.upload.get("grow", {}).values())


class GrowthPlan(ClientPlan):
    """After local training, send the top-k_l gradient entries among each layer's candidates.
    `penalty`: BaE's term, carried with lam 0 in rounds that do not extrude (see
    `MaskedWeightPenalty`: one step graph for all rounds)."""

    def __init__(self, lr: float, request: dict[str, tuple[int, torch.Tensor]] | None, full_grad: bool,
                 penalty: MaskedWeightPenalty | None = None):
        super().__init__(lr)
        self.request = request  # layer -> (k_l, candidate mask)
        self.full_grad = full_grad
        self._penalty = penalty

    def penalty(self):
        return self._penalty

    def finish(self, model, trainer, client, gen) -> dict:
        if not self.request:
            return {}
        grads = trainer.effective_weight_grads(model, client, gen, self.full_grad)
        return {"grow": {name: topk_message(grads[name], cand, k) for name, (k, cand) in self.request.items()}}


class BaEPlan(GrowthPlan):
    """Budget-aware extrusion: lambda * ||theta_low||^2 added to the loss (`penalty`, its
    gradient in closed form; its kind, masks and lambda set by the strategy for the round),
    step size max(eta, beta) from `bae`'s schedule settings."""

    def __init__(self, lr, request, full_grad, penalty: MaskedWeightPenalty, bae, lr0: float, window_offset: int):
        super().__init__(lr, request, full_grad, penalty)
        self.bae, self.lr0 = bae, lr0
        self.window_offset = window_offset  # rounds of the extrusion window already behind this one

    def begin(self, model, total_steps):
        mods = prunable_modules(model)
        self.weights = [mods[n].weight for n in self._penalty.masks] if self._penalty is not None else []
        self.device = next(model.parameters()).device
        self.budget = total_steps * self.bae.rounds
        self.step0 = self.window_offset * total_steps

    def low_norm(self, order: str = "l2") -> torch.Tensor:
        """||theta_low|| on the device, in a few multi-tensor kernels (it runs eagerly every step);
        0 without a penalty (no layer has targets: a Flower client gets none then)."""
        if self._penalty is None:
            return torch.zeros((), device=self.device)
        return self._penalty.norm(self.weights, 1 if order == "l1" else 2)

    def step_lr(self, step, model):
        """BaE's step size as a device tensor: no host sync (the step reads it on the device)."""
        with torch.no_grad():
            norm = self.low_norm(self.bae.sigmoid_norm)
        s = min(self.step0 + step, self.budget - 1)
        return bae_step_size(s, self.budget, self.lr, self.lr0, norm, self.bae.psi, self.bae.max_lr)


@register_method("fedmef", spec=BaESpec, section="bae")
class FedMef(StaticSparse):
    """FedMef (Huang et al., CVPR 2024): server-side prune/grow with budget-aware extrusion."""

    dynamic = True

    def __init__(self, recipe):
        super().__init__(recipe)
        self.low: dict[str, torch.Tensor] = {}  # theta_low of the coming adjustment, once computed
        self.low_round: int | None = None  # the adjustment round it belongs to
        self.request: dict | None = None  # this round's growth request, shared by its clients
        self.penalty: MaskedWeightPenalty | None = None  # BaE's term, written in place every round

    @property
    def window(self) -> int:
        """Rounds ending with an adjustment round in which theta_low is known to clients."""
        bae = self.recipe.method.bae
        return bae.rounds if bae.enabled else 1

    def _sends_low(self, t: int) -> bool:
        return self.low_round is not None and 0 <= self.low_round - t < self.window

    def _extruding(self, t: int) -> bool:
        return self.recipe.method.bae.enabled and self._sends_low(t)

    # -- server -> client ---------------------------------------------------
    def _prepare_low(self, t: int, model: nn.Module) -> None:
        """Compute theta_low when a window ending in an adjustment round starts."""
        sp = self.recipe.method.sparsity
        if not is_extrusion_round(t, sp.delta_t, sp.t_end, self.window):
            return
        target = next_adjustment_round(t, sp.delta_t, sp.t_end)
        if self.low_round == target:
            return
        frac = adjustment_fraction(target, sp.alpha, sp.t_end)
        mods = prunable_modules(model)
        self.low = {}
        for name, mask in get_masks(model).items():
            if bool(mask.all()):
                continue  # dense layers (ERK fallback) are not adjusted
            k = swap_count(frac, int(mask.sum()))
            self.low[name] = smallest_active(mods[name].weight, mask, k)
        self.low_round = target

    def begin_round(self, t: int, model: nn.Module) -> dict:
        self._prepare_low(t, model)
        # theta_low read back from a checkpoint lives on the CPU; one copy on the model's device
        # serves every client of the window (the same tensors, so their step graphs are reused)
        device = next(model.parameters()).device
        self.low = {n: m.to(device) for n, m in self.low.items()}
        bae = self.recipe.method.bae
        if bae.enabled:
            if self.penalty is None:  # its tensors in the layout the client models train in
                fmt = torch.channels_last if layout.channels_last_for(self.recipe.channels_last, device) else None
                mods = prunable_modules(model)
                like = {n: mods[n].weight for n in get_masks(model)}
                if fmt is not None:
                    like = {n: torch.empty_like(w, memory_format=fmt) if w.dim() == 4 else w for n, w in like.items()}
                self.penalty = MaskedWeightPenalty(bae.penalty, like)
            extruding = self._extruding(t)
            self.penalty.set_(self.low if extruding else {}, bae.lam if extruding else 0.0)
        self.request = None
        if self.low_round == t:  # adjustment round: clients send top-k_l among the post-prune inactive entries
            masks = get_masks(model)
            self.request = {n: (int(low.sum()), ~masks[n] | low) for n, low in self.low.items()}
        return {"low_norm_start": self._low_norm(model)} if self._extruding(t) else {}

    @torch.no_grad()
    def _low_norm(self, model) -> float:
        mods = prunable_modules(model)
        return float(self.penalty.norm([mods[n].weight for n in self.penalty.masks]))  # its masks: theta_low

    def client_plan(self, t, lr, model):
        full = self.recipe.method.sparsity.grow_grad == "full"
        if self._extruding(t):
            bae = self.recipe.method.bae
            offset = bae.rounds - 1 - (self.low_round - t)
            return BaEPlan(lr, self.request, full, self.penalty, bae, self.recipe.fl.lr, offset)
        return GrowthPlan(lr, self.request, full, self.penalty)

    def download_bytes(self, model, t):
        extra = sum(mask_bytes(m) for m in self.low.values()) if self._sends_low(t) else 0
        return super().download_bytes(model, t) + extra

    def upload_bytes(self, result):
        return growth_upload_bytes(result)

    # -- server -------------------------------------------------------------
    def end_round(self, t, model, results, evaluate):
        logs = {"low_norm_end": self._low_norm(model)} if self._extruding(t) else {}
        if self.low_round != t:  # theta_low always belongs to an adjustment round
            return logs
        acc_before, _ = evaluate(model)
        total_w = float(sum(r.num_samples for r in results))
        mods = prunable_modules(model)
        masks = get_masks(model)
        swapped = 0
        with torch.no_grad():
            for name, low in self.low.items():
                msgs = [(*r.upload["grow"][name], r.num_samples / total_w) for r in results]
                score = sum_messages(low.shape, msgs, device=low.device)
                new_mask, grown = prune_and_grow(masks[name], low, score)
                mods[name].weight_mask.copy_(new_mask)
                mods[name].weight.mul_(new_mask)
                mods[name].weight.masked_fill_(grown, 0.0)  # grown entries start at exactly 0
                swapped += int(low.sum())
        acc_after, _ = evaluate(model)
        logs.update({"adjusted": True, "swapped": swapped, "acc_before_adjust": acc_before,
                     "acc_after_adjust": acc_after})
        self.low, self.low_round, self.request = {}, None, None
        return logs

    # -- checkpointing ------------------------------------------------------
    def state_tensors(self):
        out = {f"low.{n}": m for n, m in self.low.items()}
        if self.low_round is not None:
            out["low_round"] = torch.tensor([self.low_round])
        return out

    def load_state_tensors(self, tensors):
        self.low = {k[4:]: v.bool() for k, v in tensors.items() if k.startswith("low.")}
        self.low_round = int(tensors["low_round"][0]) if "low_round" in tensors else None

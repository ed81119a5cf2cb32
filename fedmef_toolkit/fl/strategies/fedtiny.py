"""FedTiny (Huang et al., "Distributed Pruning Towards Tiny Neural Networks in Federated Learning", ICDCS 2023).

Two modules:

1. Adaptive BatchNorm selection (`prepare`, before round 1). The server makes
   `candidates` coarse-pruned versions of the initial model at
   `initial_density` (candidate 0: per-layer magnitude pruning; the others:
   random masks with their own seeds; ERK layer densities for all). Each of
   `selection_clients` clients re-estimates every candidate's BatchNorm
   statistics on its local data (forward passes in training mode, cumulative
   averages) and reports them with the candidate's loss under those
   statistics. The server keeps the candidate with the lowest sample-weighted
   loss and gives it the pooled statistics of the clients.
   BN-free models (NSConv) have no statistics to re-estimate: each filter is
   standardised over its active weights, so a candidate's normalisation
   follows from its mask alone. Clients then report only the loss.
2. Progressive block-wise pruning. Blocks are the residual / inverted
   residual blocks (stem and classifier on their own). Every
   method.sparsity.delta_t rounds up to t_end one block is adjusted, in
   `block_order`, cycling: per layer, clients send their top-g_l gradient
   entries among that block's candidates only; the server prunes p_l
   smallest-|w| active entries and grows g_l by aggregated gradient, with
   p_l = k_l + max(0, nnz_l - target_l), g_l = k_l + max(0, target_l - nnz_l)
   and k_l = ceil(a_t * min(nnz_l, target_l)), so after a block's first
   adjustment its layers hold exactly their target-density ERK counts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...fields import spec_field
from ...sparse.adjust import largest_inactive, smallest_active, sum_messages
from ...sparse.masks import attach_masks, get_masks, init_masks, layer_counts, prunable_modules
from ...sparse.schedules import adjustment_fraction, is_adjustment_round, swap_count
from ..comm import state_bytes
from ..plan import ClientPlan
from .fedmef import GrowthPlan, growth_upload_bytes
from .registry import register_method
from .sparse import StaticSparse


@dataclass
class FedTinySpec:
    """Recipe section `method.fedtiny`."""

    candidates: int = spec_field(4, lo=1, hi=64, help="coarse-pruned candidate models for adaptive BN selection")
    initial_density: float | None = spec_field(None, lo=0.0, lo_open=True, hi=1.0,
                                               help="density of the candidates, pruned progressively to "
                                                    "method.sparsity.density (null: that density)")
    selection_clients: int | None = spec_field(None, lo=1, hi=1_000_000,
                                               help="clients that evaluate the candidates (null: fl.clients_per_round)")
    bn_batches: int = spec_field(4, lo=1, hi=100_000,
                                 help="local batches each selection client uses for statistics and loss")
    block_order: str = spec_field("forward", choices=["forward", "backward"],
                                  help="order of the block-wise adjustments: input to output, or output to input")


# -- pure pieces -----------------------------------------------------------------

def block_of(layer: str) -> str:
    """A layer's block: its name up to the first numeric part ('layer2.1.conv1.0' -> 'layer2.1',
    'features.3.block.0.0' -> 'features.3', 'fc' -> 'fc')."""
    parts = layer.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def block_sequence(layers: list[str], order: str = "forward") -> list[tuple[str, list[str]]]:
    """(block, its layers) in definition order ('forward') or reversed ('backward')."""
    blocks: dict[str, list[str]] = {}
    for name in layers:
        blocks.setdefault(block_of(name), []).append(name)
    seq = list(blocks.items())
    return seq[::-1] if order == "backward" else seq


def select_candidate(losses: np.ndarray, samples: np.ndarray) -> int:
    """losses[c, j]: client c's summed loss for candidate j over samples[c] examples.
    The candidate with the lowest sample-weighted mean loss (first on ties)."""
    return int(np.argmin(losses.sum(axis=0) / samples.sum()))


def pooled_bn_stats(stats: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, torch.Tensor]:
    """Pool per-client BN statistics (keys '<bn>.running_mean' / '<bn>.running_var') into the
    mean and variance of the union of the clients' samples."""
    n = float(sum(counts))
    out = {}
    for key in stats[0]:
        if not key.endswith("running_mean"):
            continue
        base = key[: -len("running_mean")]
        means = [s[key].double() for s in stats]
        vars_ = [s[base + "running_var"].double() for s in stats]
        mean = sum(c * m for c, m in zip(counts, means)) / n
        second = sum(c * (v + m * m) for c, m, v in zip(counts, means, vars_)) / n
        out[key] = mean.float()
        out[base + "running_var"] = (second - mean * mean).clamp_min(0).float()
    return out


def progressive_counts(nnz: int, target: int, fraction: float) -> tuple[int, int]:
    """(entries pruned, entries grown) of one layer's adjustment: the swap k plus the step to the target."""
    k = swap_count(fraction, min(nnz, target))
    return k + max(0, nnz - target), k + max(0, target - nnz)


@torch.no_grad()
def client_candidate_report(model: nn.Module, batches) -> tuple[dict[str, torch.Tensor], float, int]:
    """One client's work for one candidate: re-estimate BN statistics on its batches (training-mode
    forward passes, cumulative average), then the summed loss under them (eval mode).
    Returns (statistics, summed loss, samples); no statistics for BN-free models."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches
    batches = list(batches)
    if bns:
        model.train()
        for x, _ in batches:
            model(x)
    model.eval()
    loss, n = 0.0, 0
    for x, y in batches:
        loss += float(F.cross_entropy(model(x), y, reduction="sum"))
        n += int(y.numel())
    stats = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.endswith("running_mean") or k.endswith("running_var")}
    return stats, loss, n


@register_method("fedtiny", spec=FedTinySpec)
class FedTiny(StaticSparse):
    """FedTiny (Huang et al., ICDCS 2023): adaptive BN selection, then progressive block-wise prune/grow."""

    dynamic = True

    def __init__(self, recipe):
        super().__init__(recipe)
        self.pending: dict[str, tuple[torch.Tensor, int]] = {}  # this round's layer -> (prune mask, grow count)
        self.request: dict | None = None
        self.block: str | None = None

    @property
    def spec(self) -> FedTinySpec:
        return self.recipe.method.fedtiny

    @property
    def initial_density(self) -> float:
        return self.spec.initial_density or self.recipe.method.sparsity.density

    def setup(self, model, seed):
        # dense masks: the candidates are pruned from the dense initial weights in prepare
        sp = self.recipe.method.sparsity
        attach_masks(model, {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_modules(model).items()})
        self.target = layer_counts(model, sp.density, sp.distribution)

    # -- module 1: adaptive BN selection ---------------------------------------------
    def candidate_masks(self, model, seed) -> list[dict[str, torch.Tensor]]:
        dist = self.recipe.method.sparsity.distribution
        return [init_masks(model, self.initial_density, dist, "magnitude" if j == 0 else "random", seed + j)
                for j in range(self.spec.candidates)]

    def prepare(self, model, ctx):
        spec = self.spec
        count = min(spec.selection_clients or self.recipe.fl.clients_per_round, ctx.num_clients)
        cids = sorted(np.random.default_rng([ctx.seed, 0]).choice(ctx.num_clients, count, replace=False).tolist())
        cands = self.candidate_masks(model, ctx.seed)
        worker = copy.deepcopy(model)
        losses = np.zeros((len(cids), len(cands)))
        samples = np.zeros(len(cids))
        stats: list[list[dict]] = [[] for _ in cands]
        counts: list[int] = []
        down = up = 0
        for c, cid in enumerate(cids):
            batches = list(ctx.client_batches(cid, spec.bn_batches))
            for j, masks in enumerate(cands):
                worker.load_state_dict(model.state_dict())
                attach_masks(worker, masks)
                down += state_bytes(worker.state_dict())
                s, loss, n = client_candidate_report(worker, batches)
                stats[j].append(s)
                losses[c, j], samples[c] = loss, n
                up += sum(v.numel() * v.element_size() for v in s.values()) + 4  # statistics + the loss
            counts.append(int(samples[c]))
        best = select_candidate(losses, samples)
        attach_masks(model, cands[best])
        if stats[best] and stats[best][0]:
            model.load_state_dict(pooled_bn_stats(stats[best], counts), strict=False)
        mean_losses = (losses.sum(axis=0) / samples.sum()).round(6).tolist()
        return {"selected_candidate": best, "candidate_losses": mean_losses, "selection_clients": cids,
                "bytes_up": up, "bytes_down": down}

    # -- module 2: progressive block-wise prune/grow ------------------------------------
    def blocks(self, model) -> list[tuple[str, list[str]]]:
        adjustable = [n for n, m in get_masks(model).items() if self.target[n] < m.numel()]
        return block_sequence(adjustable, self.spec.block_order)

    def begin_round(self, t, model):
        sp = self.recipe.method.sparsity
        self.pending, self.request, self.block = {}, None, None
        blocks = self.blocks(model)
        if not blocks or not is_adjustment_round(t, sp.delta_t, sp.t_end):
            return {}
        self.block, layers = blocks[(t // sp.delta_t - 1) % len(blocks)]
        frac = adjustment_fraction(t, sp.alpha, sp.t_end)
        mods, masks = prunable_modules(model), get_masks(model)
        for name in layers:
            p, g = progressive_counts(int(masks[name].sum()), self.target[name], frac)
            self.pending[name] = (smallest_active(mods[name].weight, masks[name], p), g)
        self.request = {n: (g, ~masks[n] | low) for n, (low, g) in self.pending.items()}
        return {"block": self.block}

    def client_plan(self, t, lr, model):
        if not self.request:
            return ClientPlan(lr)
        return GrowthPlan(lr, self.request, self.recipe.method.sparsity.grow_grad == "full")

    def upload_bytes(self, result):
        return growth_upload_bytes(result)

    def end_round(self, t, model, results, evaluate):
        if not self.pending:
            return {}
        acc_before, _ = evaluate(model)
        total_w = float(sum(r.num_samples for r in results))
        mods, masks = prunable_modules(model), get_masks(model)
        swapped = 0
        with torch.no_grad():
            for name, (low, g) in self.pending.items():
                msgs = [(*r.upload["grow"][name], r.num_samples / total_w) for r in results]
                score = sum_messages(low.shape, msgs, device=low.device)
                kept = masks[name] & ~low
                grown = largest_inactive(score, ~kept, g)
                mods[name].weight_mask.copy_(kept | grown)
                mods[name].weight.mul_(kept | grown)
                mods[name].weight.masked_fill_(grown, 0.0)  # grown entries start at exactly 0
                swapped += g
        acc_after, _ = evaluate(model)
        self.pending, self.request = {}, None
        return {"adjusted": True, "swapped": swapped, "acc_before_adjust": acc_before, "acc_after_adjust": acc_after}

"""Local training on one client: masked SGD driven by a strategy's ClientPlan."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sparse.masks import prunable_modules
from .agc import adaptive_clip_, agc_weights
from .graphs import GraphedForward
from .plan import ClientPlan


@dataclass
class ClientData:
    """One client's share of the training set; indices point into the device-resident data."""

    cid: int
    indices: torch.Tensor  # int64 on the training device

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel())


@dataclass
class ClientResult:
    cid: int
    num_samples: int
    state: dict[str, torch.Tensor]
    loss: float
    steps: int
    upload: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)


class ClientTrainer:
    """Runs E local epochs of SGD for one client; the same code for every method."""

    def __init__(self, train_x, train_y, augment, *, epochs: int, batch_size: int, momentum: float,
                 weight_decay: float, precision: str = "fp32", cuda_graphs: bool = True, agc: float = 0.0):
        self.train_x, self.train_y = train_x, train_y
        self.agc = agc
        self.augment = augment
        self.epochs, self.batch_size = epochs, batch_size
        self.momentum, self.weight_decay = momentum, weight_decay
        self.precision = precision
        self.cuda_graphs = cuda_graphs and train_x.is_cuda
        self.graphed: GraphedForward | None = None

    def autocast(self):
        dev = self.train_x.device.type
        if self.precision == "bf16" and dev == "cuda":
            # no weight-cast cache: CUDA graph capture does not support it, and each
            # weight is used once per forward, so the cache would save nothing
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def forward_for(self, model: nn.Module):
        """The training forward: replayed from a CUDA graph where it can be (see graphs.py)."""
        if not self.cuda_graphs:
            return model
        if self.graphed is None or self.graphed.model is not model:
            self.graphed = GraphedForward(model, self.batch_size)
        return self.graphed

    def graph_status(self) -> str:
        """One line for the run log: whether client steps were replayed from CUDA graphs."""
        g = self.graphed
        if not self.cuda_graphs or g is None:
            return "CUDA graphs: off"
        if g.refused:
            return f"CUDA graphs: off ({g.refused})"
        return f"CUDA graphs: on ({g.replays} steps replayed, {g.eager_calls} eager: short batches, gradient passes)"

    def steps_per_epoch(self, n: int) -> int:
        # A trailing batch of one sample is dropped: BatchNorm cannot train on it.
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest > 1 else 0)

    def total_steps(self, n: int) -> int:
        return self.epochs * self.steps_per_epoch(n)

    def batches(self, client: ClientData, gen: torch.Generator, epochs: int):
        n = client.num_samples
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen, device=gen.device).to(client.indices.device)
            for s in range(self.steps_per_epoch(n)):
                idx = client.indices[order[s * self.batch_size:(s + 1) * self.batch_size]]
                yield self.augment.train(self.train_x[idx], gen), self.train_y[idx]

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.SGD:
        decay, no_decay = [], []
        for p in model.parameters():
            (decay if p.dim() > 1 else no_decay).append(p)  # no decay on biases, gains, norm params
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=lr, momentum=self.momentum)

    def train(self, model: nn.Module, client: ClientData, plan: ClientPlan, gen: torch.Generator) -> ClientResult:
        model.train()
        forward = self.forward_for(model)
        opt = self._optimizer(model, plan.lr)
        # Mask buffers are only ever changed in place (plans copy_ into them), so the
        # (weight, mask) pairs can be collected once per client.
        pairs = masked_weights(model)
        weights, masks = [w for w, _ in pairs], [m for _, m in pairs]
        clipped = agc_weights(model) if self.agc > 0 else None
        total = self.total_steps(client.num_samples)
        plan.begin(model, total)
        loss_sum = torch.zeros((), device=self.train_x.device)
        step = 0
        for x, y in self.batches(client, gen, self.epochs):
            if forward is not model:
                forward.capture_allowed = step == 0
            plan.at_step(step, model, self, client, gen)
            lr = plan.step_lr(step, model)
            for group in opt.param_groups:
                group["lr"] = lr
            with self.autocast():
                loss = F.cross_entropy(forward(x), y)
            extra = plan.extra_loss(model)
            total_loss = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            with torch.no_grad():
                apply_step_masks(opt, weights, masks, clip=None if clipped is None else
                                 lambda: adaptive_clip_(clipped, self.agc))
            loss_sum += loss.detach().float()
            step += 1
        upload = plan.finish(model, self, client, gen)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return ClientResult(client.cid, client.num_samples, state, float(loss_sum) / max(1, step), step, upload, plan.logs)

    def effective_weight_grads(self, model: nn.Module, client: ClientData, gen: torch.Generator,
                               full: bool) -> dict[str, torch.Tensor]:
        """Dense loss gradient wrt each prunable layer's effective weight.

        For plain conv/linear layers that is weight.grad (dense: pruned entries
        are zeros, not absent). For NSConv it is the gradient wrt the
        standardised weight w_hat, since the raw weight's gradient is masked
        by construction and says nothing about inactive connections.
        """
        model.train()
        modules = prunable_modules(model)
        for m in modules.values():
            m.capture_effective_grad = True
        model.zero_grad(set_to_none=True)
        n = client.num_samples
        count = 0
        for x, y in self.batches(client, gen, 1):
            with self.autocast():
                loss = F.cross_entropy(model(x), y, reduction="sum") / n
            loss.backward()
            count += x.shape[0]
            if not full:
                break
        grads = {}
        for name, m in modules.items():
            m.capture_effective_grad = False
            eff = getattr(m, "_effective_grad", None)
            g = eff if eff is not None else m.weight.grad
            grads[name] = (g.detach().float() * (n / count)) if g is not None else torch.zeros_like(m.weight)
            m._effective_grad = None
        model.zero_grad(set_to_none=True)
        return grads


def apply_step_masks(opt: torch.optim.Optimizer, weights: list, masks: list, clip=None) -> None:
    """One optimizer step that leaves pruned entries, their gradient and momentum at 0.
    Grouped (foreach) ops: two or three kernel launches instead of one per layer.
    `clip` (e.g. adaptive gradient clipping) runs on the masked gradients, before the step."""
    if not weights:
        if clip is not None:
            clip()
        opt.step()
        return
    grads = [w.grad for w in weights]
    if all(g is not None for g in grads):
        torch._foreach_mul_(grads, masks)
    else:
        for g, m in zip(grads, masks):
            if g is not None:
                g.mul_(m)
    if clip is not None:
        clip()
    opt.step()
    torch._foreach_mul_(weights, masks)
    bufs = [opt.state.get(w, {}).get("momentum_buffer") for w in weights]
    if all(b is not None for b in bufs):  # a mask changed mid-training leaves momentum behind
        torch._foreach_mul_(bufs, masks)


def masked_weights(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight, m.weight_mask) for m in prunable_modules(model).values()
            if getattr(m, "weight_mask", None) is not None]


def client_generator(seed: int, round_idx: int, cid: int, device: torch.device) -> torch.Generator:
    """Per (round, client) random stream: resuming at any round reproduces the same draws."""
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed((seed * 1_000_003 + round_idx * 10_007 + cid) % (2**63 - 1))
    return gen

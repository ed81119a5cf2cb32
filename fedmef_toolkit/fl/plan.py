"""What a strategy adds to one client's local training in one round.

The client trainer calls these hooks and knows nothing about methods; a
method overrides only the hooks where it differs from plain local SGD.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MaskedWeightPenalty:
    """lam * ||theta_m|| ** 2 ("l2sq") or lam * ||theta_m|| ("l2"), where theta_m is every listed
    layer's weight times its mask (one norm over all of them): BaE's extrusion term (SPEC 3).

    Its gradient, 2 lam w m or lam w m / ||theta_m||, is added to the local step's gradients in
    closed form (`add_grad_`: one multi-tensor kernel for "l2sq", a few for "l2"; no autograd
    graph), before the gradient masks and clipping, as autograd would have added it. `value` is
    the same term through autograd (the reference the tests compare against).

    The masks and lam are tensors owned by the strategy and written in place from round to
    round (`set_`; lam 0 and no targets where a round does not extrude): a step captured in a
    CUDA graph (fl/stepgraph.py) reads them at their addresses, so the rounds before, during and
    after an extrusion window replay one graph instead of capturing a new one at each change.
    `like`: per layer a tensor with the weight's shape and the memory format the client models
    train in (multi-tensor kernels take their fast path only where all operands share a layout).
    """

    def __init__(self, kind: str, like: dict[str, torch.Tensor]):
        if kind not in ("l2sq", "l2"):
            raise ValueError(f"penalty must be 'l2sq' or 'l2', got {kind!r}")
        self.kind = kind
        first = next(iter(like.values()))
        dtype = first.dtype if first.is_floating_point() else torch.float32
        self.masks = {n: torch.zeros_like(t, dtype=dtype) for n, t in like.items()}
        # "l2sq": the gradient's factor per entry, 2 lam m (written with the masks): grad += w * it
        self.scaled = {n: torch.zeros_like(m) for n, m in self.masks.items()} if kind == "l2sq" else {}
        self.lam = torch.zeros((), dtype=dtype, device=first.device)
        self.targets: tuple[str, ...] = ()  # the layers `set_` gave masks (the others' are zero)
        self.lam_value = 0.0  # what `lam` holds, on the host
        # its tensors are only ever written in place: their addresses, read at every step, are fixed
        tensors = [self.lam, *self.masks.values(), *self.scaled.values()]
        self._graph_key = (id(self), kind, tuple(t.data_ptr() for t in tensors))

    @torch.no_grad()
    def set_(self, targets: dict[str, torch.Tensor], lam: float) -> None:
        """The layers' masks (zero where `targets` has none) and lam, in place."""
        unknown = set(targets) - set(self.masks)
        if unknown:
            raise KeyError(f"no such layer in the penalty: {sorted(unknown)}")
        for n, m in self.masks.items():
            if n in targets:
                m.copy_(targets[n])
            else:
                m.zero_()
        self.lam.fill_(lam)
        for n, scaled in self.scaled.items():
            scaled.copy_(self.masks[n]).mul_(2.0 * float(lam))
        self.targets, self.lam_value = tuple(targets), float(lam)

    @property
    def active(self) -> bool:
        """Whether any layer has targets (BaE: an extrusion round; its step size reads their
        norm whatever lam is)."""
        return bool(self.targets)

    def graph_key(self) -> tuple:
        """What a graph of a step that applies this penalty reads: its tensors' addresses."""
        return self._graph_key

    def _masked(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """theta_m: each weight (detached) times its mask; `weights` in the order of `masks`."""
        return torch._foreach_mul([w.detach() for w in weights], list(self.masks.values()))

    def norm(self, weights: list[torch.Tensor], order: int = 2) -> torch.Tensor:
        """||theta_m|| (L1 with order=1) of `weights`, listed in the order of `masks`."""
        return torch.stack(torch._foreach_norm(self._masked(weights), order)).norm(order)

    def value(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """The term itself, differentiable (autograd); `weights` in the order of `masks`."""
        sq = sum(((w * m) ** 2).sum() for w, m in zip(weights, self.masks.values()))
        return self.lam * (sq if self.kind == "l2sq" else torch.sqrt(sq + 1e-24))

    @torch.no_grad()
    def add_grad_(self, weights: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """grads += d value / d weights, in place; both lists in the order of `masks`, a gradient
        None where a weight has none (it gets nothing; its weight still counts in the norm)."""
        live = [(n, w, g) for n, w, g in zip(self.masks, weights, grads) if g is not None]
        if not live:
            return
        if self.kind == "l2sq":
            torch._foreach_addcmul_([g for _, _, g in live], [w for _, w, _ in live], [self.scaled[n] for n, _, _ in live])
            return
        low = self._masked(weights)
        sq = torch.stack(torch._foreach_norm(low)).square().sum()
        coef = self.lam * torch.rsqrt(sq + 1e-24)
        keep = [i for i, g in enumerate(grads) if g is not None]
        parts = [low[i] for i in keep]
        torch._foreach_mul_(parts, coef)
        torch._foreach_add_([grads[i] for i in keep], parts)


class ClientPlan:
    def __init__(self, lr: float):
        self.lr = lr
        self.logs: dict = {}

    def begin(self, model: nn.Module, total_steps: int) -> None:
        """Called once before the first local step."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss at every step, through autograd (a penalty on masked
        weights, such as BaE's, is `penalty` instead: no autograd graph). It is part of the
        local step that is captured in a CUDA graph (fl/stepgraph.py): it must compute the same
        thing at every step of a client from tensors whose values may change in place, and
        every tensor it reads other than the model's parameters and buffers, and every
        Python value it bakes in, must be described by `graph_key`."""
        return None

    def graph_key(self) -> tuple:
        """A hashable of what `extra_loss` depends on besides the model (data_ptrs of the
        tensors it reads, constants it bakes in): a CUDA graph of the step is replayed only
        while this is unchanged, and captured again otherwise. () when there is no extra loss."""
        return ()

    def penalty(self) -> MaskedWeightPenalty | None:
        """A penalty on masked weights whose gradient each local step adds in closed form
        (BaE). Keyed by layer name (`sparse.masks.prunable_modules`); a step's graph is kept
        as long as it is the same object (its tensors change in place)."""
        return None

    def at_step(self, step: int, model: nn.Module, trainer, client, gen) -> None:
        """Called before local step `step` (e.g. FedDST's mid-training mask change). It may
        change tensors in place or register new ones under existing names; it must not add,
        remove or replace modules (the step collects the modules once per client)."""

    def step_lr(self, step: int, model: nn.Module) -> float | torch.Tensor:
        """Learning rate of local step `step` (0-based): a float, or a 0-dim tensor on the
        training device when it depends on the model (no host sync to read it)."""
        return self.lr

    def finish(self, model: nn.Module, trainer, client, gen) -> dict:
        """After local training: extra things the client uploads (e.g. gradient top-k)."""
        return {}

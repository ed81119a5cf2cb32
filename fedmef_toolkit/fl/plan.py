"""What a strategy adds to one client's local training in one round.

The client trainer calls these hooks and knows nothing about methods; a
method overrides only the hooks where it differs from plain local SGD.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ClientPlan:
    def __init__(self, lr: float):
        self.lr = lr
        self.logs: dict = {}

    def begin(self, model: nn.Module, total_steps: int) -> None:
        """Called once before the first local step."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss at every step (e.g. BaE's penalty). It is part of the
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

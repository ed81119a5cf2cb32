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
        """A term added to the task loss at every step (e.g. BaE's penalty)."""
        return None

    def at_step(self, step: int, model: nn.Module, trainer, client, gen) -> None:
        """Called before local step `step` (e.g. FedDST's mid-training mask change)."""

    def step_lr(self, step: int, model: nn.Module) -> float:
        """Learning rate of local step `step` (0-based)."""
        return self.lr

    def finish(self, model: nn.Module, trainer, client, gen) -> dict:
        """After local training: extra things the client uploads (e.g. gradient top-k)."""
        return {}

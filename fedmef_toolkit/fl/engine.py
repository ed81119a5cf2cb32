"""Engines run one round's client updates; strategies do not care which one runs.

`SequentialEngine` trains the sampled clients one after another on a single
worker copy of the model, in this process (the embedded default).
"""

from __future__ import annotations

import copy

import torch.nn as nn

from .client import ClientData, ClientResult, ClientTrainer, client_generator


class SequentialEngine:
    def __init__(self, trainer: ClientTrainer, seed: int):
        self.trainer = trainer
        self.seed = seed
        self.worker: nn.Module | None = None

    def run_round(self, t: int, global_model: nn.Module, clients: list[ClientData], make_plan) -> list[ClientResult]:
        if self.worker is None:
            self.worker = copy.deepcopy(global_model)
        state = global_model.state_dict()
        results = []
        device = next(global_model.parameters()).device
        for client in clients:
            self.worker.load_state_dict(state)
            gen = client_generator(self.seed, t, client.cid, device)
            results.append(self.trainer.train(self.worker, client, make_plan(), gen))
        return results


ENGINES = {"sequential": SequentialEngine}

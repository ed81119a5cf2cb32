"""Engines run one round's client updates; strategies do not care which one runs.

`SequentialEngine` trains the sampled clients one after another on a single
worker copy of the model, in this process (the embedded default on the CPU).
`BatchedEngine` (batched.py) trains them together as one computation per
step, which is what a GPU needs at federated batch sizes. `FlowerEngine`
(fedmef_toolkit/flower) sends them to Flower SuperNodes. `select_engine`
resolves `fl.engine` (auto, sequential, batched, flower) and says why.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import UserError
from .batched import BatchedEngine
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

    def status(self) -> str:
        return "sequential engine; " + self.trainer.graph_status()


ENGINES = {"sequential": SequentialEngine, "batched": BatchedEngine}


def select_engine(requested: str, model: nn.Module, example: torch.Tensor) -> tuple[str, str]:
    """(engine name, why) for `fl.engine`. auto picks the engine measured faster: today that
    is the sequential one on the CPU (two cores) and on an H200 too (the batched engine ran at
    0.66-0.79x; docs/benchmarks.md), so auto is sequential until a faster batched step lands.
    `example`: a normalised input batch on the device."""
    if requested == "sequential":
        return "sequential", "fl.engine: sequential"
    if requested == "flower":
        return "flower", "fl.engine: flower (clients run as Flower ClientApps)"
    if requested == "auto":
        where = "on the CPU" if example.device.type != "cuda" else "(the batched engine measured slower on GPUs)"
        return "sequential", f"fl.engine auto: sequential {where}"
    from .stacked import stacking_problem

    problem = stacking_problem(model, example)
    if problem:
        raise UserError(f"fl.engine: batched cannot train this model: {problem}; use auto or sequential")
    return "batched", "fl.engine: batched"


def build_engine(name: str, trainer: ClientTrainer, seed: int, max_clients: int = 0, recipe=None,
                 arch_desc=None):
    if name == "flower":  # its Grid is attached where a ServerApp runs (fedmef_toolkit/flower)
        from ..flower import require_flower
        from ..flower.engine import FlowerEngine

        require_flower()
        return FlowerEngine(recipe, arch_desc, seed)
    if name == "batched":
        return BatchedEngine(trainer, seed, max_clients)
    return SequentialEngine(trainer, seed)

"""Engines run one round's client updates; strategies do not care which one runs.

`SequentialEngine` trains the sampled clients one after another on a single
worker copy of the model, in this process (the embedded default on the CPU).
`StreamsEngine` (streams.py, `fl.engine: batched`) trains several together on
one GPU, each on its own worker copy and CUDA stream, which is what a GPU
needs at federated batch sizes. `FlowerEngine`
(fedmef_toolkit/flower) sends them to Flower SuperNodes. `select_engine`
resolves `fl.engine` (auto, sequential, batched, flower) and says why.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from .client import ClientData, ClientResult, ClientTrainer, client_generator
from .streams import StreamsEngine


class SequentialEngine:
    def __init__(self, trainer: ClientTrainer, seed: int):
        self.trainer = trainer
        self.seed = seed
        self.worker: nn.Module | None = None

    def run_round(self, t: int, global_model: nn.Module, clients: list[ClientData], make_plan) -> list[ClientResult]:
        if self.worker is None:
            self.worker = self.trainer.worker_copy(global_model)
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


ENGINES = {"sequential": SequentialEngine, "batched": StreamsEngine}

#: what `fl.engine: auto` picks on a GPU: measured alone on one H200 (benchmarks/bench_engine.py,
#: docs/benchmarks.md, issue 10), the batched engine ran every shipped ResNet18/CIFAR-10 recipe at
#: 1.1-1.7x (by method and machine), FedMef MobileNetV2 (CIFAR-10) at 1.65x and the narrow ResNet
#: at 2.00x the sequential engine's samples/s (rounds 2-11, a mask adjustment included).
AUTO_ON_CUDA = "batched"
AUTO_ON_CUDA_WHY = "1.1-2.0x the sequential engine on an H200 for every shipped ResNet18/CIFAR-10 recipe, docs/benchmarks.md"


def select_engine(requested: str, model: nn.Module, example: torch.Tensor) -> tuple[str, str]:
    """(engine name, why) for `fl.engine`. auto picks the engine measured faster: the sequential
    one on the CPU (no streams there: the batched engine runs its clients one after another) and
    AUTO_ON_CUDA on a GPU. `example`: a normalised input batch on the device."""
    if requested == "sequential":
        return "sequential", "fl.engine: sequential"
    if requested == "flower":
        return "flower", "fl.engine: flower (clients run as Flower ClientApps)"
    if requested == "auto":
        if example.device.type != "cuda":
            return "sequential", "fl.engine auto: sequential on the CPU"
        return AUTO_ON_CUDA, f"fl.engine auto: {AUTO_ON_CUDA} on a GPU ({AUTO_ON_CUDA_WHY})"
    return "batched", "fl.engine: batched"


def build_engine(name: str, trainer: ClientTrainer, seed: int, max_clients: int = 0, recipe=None,
                 arch_desc=None):
    if name == "flower":  # its Grid is attached where a ServerApp runs (fedmef_toolkit/flower)
        from ..flower import require_flower
        from ..flower.engine import FlowerEngine

        require_flower()
        return FlowerEngine(recipe, arch_desc, seed)
    if name == "batched":
        return StreamsEngine(trainer, seed, max_clients)
    return SequentialEngine(trainer, seed)

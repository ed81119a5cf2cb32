"""The strategy interface: what a federated method decides, and nothing else.

A strategy decides what differs between methods: the masks it keeps, the
ClientPlan each client trains with, how client results are aggregated, what
happens to the global model at the end of a round, and what each message
costs on the wire. The simulator, the engines and the client trainer are the
same for every method. FedAvg (fedavg.py) is the plainest implementation.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..client import ClientResult
from ..plan import ClientPlan


@dataclass
class ServerContext:
    """What a strategy's one-off preparation before round 1 may use (see `Strategy.prepare`).

    run_clients(tag, model, client_ids, make_plan): local training of those clients from
        `model` through the run's engine (tag: a negative round number for random streams).
    client_batches(cid, max_batches): the client's local data as normalised, un-augmented
        (images, labels) batches of fl.batch_size, for forward-only work (evaluation, statistics).
    evaluate(model): (accuracy, loss) on the held-out split.
    """

    num_clients: int
    seed: int
    lr: float
    run_clients: Callable[[int, nn.Module, list[int], Callable[[], ClientPlan]], list[ClientResult]]
    client_batches: Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    client_sizes: list[int]
    evaluate: Callable[[nn.Module], tuple[float, float]]


class Strategy(abc.ABC):
    """Abstract federated method. Subclasses register with `@register_method(name)`."""

    name: str = ""
    sparse: bool = False  # clients train a masked model
    dynamic: bool = False  # masks change on the method.sparsity schedule

    def __init__(self, recipe):
        self.recipe = recipe

    # -- lifecycle -------------------------------------------------------
    def setup(self, model: nn.Module, seed: int) -> None:
        """Prepare the initial global model (e.g. attach masks); no data involved."""

    def prepare(self, model: nn.Module, ctx: ServerContext) -> dict:
        """One-off work with clients before round 1 of a new run (not on resume), e.g. PruneFL's
        initial pruning or FedTiny's candidate selection. Returns the metrics of this 'round 0',
        with the bytes it sent as `bytes_up` / `bytes_down`; {} when there is nothing to do."""
        return {}

    def begin_round(self, t: int, model: nn.Module) -> dict:
        """Server work before clients train (e.g. choosing theta_low); returns metrics."""
        return {}

    @abc.abstractmethod
    def client_plan(self, t: int, lr: float, model: nn.Module) -> ClientPlan:
        """The plan every sampled client trains with this round (model: the global model)."""

    @abc.abstractmethod
    def aggregate(self, model: nn.Module, results: list[ClientResult], t: int) -> None:
        """Fold the round's client results into the global model."""

    def end_round(self, t: int, model: nn.Module, results: list[ClientResult],
                  evaluate: Callable[[nn.Module], tuple[float, float]]) -> dict:
        """Server work after aggregation; returns extra metrics for the round."""
        return {}

    # -- communication accounting ---------------------------------------
    @abc.abstractmethod
    def download_bytes(self, model: nn.Module, t: int) -> int:
        """Bytes the server sends one client in round t."""

    @abc.abstractmethod
    def upload_bytes(self, result: ClientResult) -> int:
        """Bytes one client sends back: its model and whatever its plan added."""

    # -- checkpointing ------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

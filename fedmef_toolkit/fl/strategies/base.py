"""The strategy interface, with FedAvg's behaviour as the default.

A strategy decides what differs between methods: the masks it keeps, the
ClientPlan each client trains with, how client results are aggregated, and
what happens to the global model at the end of a round. The simulator and
the client trainer are the same for every method.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..aggregate import weighted_average
from ..client import ClientResult
from ..comm import message_bytes, state_bytes
from ..plan import ClientPlan


class Strategy:
    name = "fedavg"

    def __init__(self, recipe):
        self.recipe = recipe

    # -- lifecycle -------------------------------------------------------
    def setup(self, model: nn.Module, seed: int) -> None:
        """Prepare the initial global model (e.g. attach masks)."""

    def begin_round(self, t: int, model: nn.Module) -> dict:
        """Server work before clients train (e.g. choosing theta_low); returns metrics."""
        return {}

    def client_plan(self, t: int, lr: float, model: nn.Module) -> ClientPlan:
        """The plan every sampled client trains with this round (model: the global model)."""
        return ClientPlan(lr)

    def aggregate(self, model: nn.Module, results: list[ClientResult], t: int) -> None:
        new = weighted_average([r.state for r in results], [r.num_samples for r in results])
        model.load_state_dict(new, strict=False)

    def end_round(self, t: int, model: nn.Module, results: list[ClientResult],
                  evaluate: Callable[[nn.Module], tuple[float, float]]) -> dict:
        """Server work after aggregation; returns extra metrics for the round."""
        return {}

    # -- communication accounting ---------------------------------------
    def download_bytes(self, model: nn.Module, t: int) -> int:
        return state_bytes(model.state_dict())

    def upload_bytes(self, result: ClientResult) -> int:
        return state_bytes(result.state) + message_bytes(result.upload.get("grow", {}).values())

    # -- checkpointing ------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

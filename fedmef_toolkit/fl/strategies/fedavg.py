"""FedAvg (McMahan et al., 2017): dense local SGD, sample-weighted averaging."""

from __future__ import annotations

from ..aggregate import weighted_average
from ..comm import state_bytes
from ..plan import ClientPlan
from .base import Strategy
from .registry import register_method


@register_method("fedavg")
class FedAvg(Strategy):
    """Dense model, weighted FedAvg (the reference every sparse method is measured against)."""

    def client_plan(self, t, lr, model):
        return ClientPlan(lr)

    def aggregate(self, model, results, t):
        new = weighted_average([r.state for r in results], [r.num_samples for r in results])
        model.load_state_dict(new, strict=False)

    def download_bytes(self, model, t):
        return state_bytes(model.state_dict())

    def upload_bytes(self, result):
        return state_bytes(result.state)

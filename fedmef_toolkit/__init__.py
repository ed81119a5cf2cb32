"""fedmef-toolkit: memory-efficient federated dynamic pruning (FedMef and baselines)."""

__version__ = "0.1.0"

"""fedmef-toolkit: memory-efficient federated dynamic pruning (FedMef and baselines).

Python API: `fedmef_toolkit.train(recipe, overrides)` runs a recipe like `fedmef train`
(fedmef_toolkit/training.py).
"""

__version__ = "0.1.0"


def train(*args, **kwargs):
    """`fedmef_toolkit.training.train`: run a recipe, return (run_dir, metrics)."""
    from .training import train as _train

    return _train(*args, **kwargs)

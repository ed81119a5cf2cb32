"""Federated methods, each a small class on the shared engine."""

from .base import Strategy
from .feddst import FedDST
from .fedmef import FedMef
from .sparse import StaticSparse

STRATEGIES = {cls.name: cls for cls in (Strategy, StaticSparse, FedDST, FedMef)}


def build_strategy(recipe) -> Strategy:
    return STRATEGIES[recipe.method.name](recipe)

"""Federated methods, each a small class on the shared engine, registered where it is defined.

Importing this package registers the built-in methods (in this order: the
recipe reference and the docs list them so).
"""

from .base import ServerContext, Strategy
from .fedavg import FedAvg
from .sparse import StaticSparse
from .feddst import FedDST
from .fedmef import FedMef
from .prunefl import PruneFL
from .fedtiny import FedTiny
from .registry import METHODS, MethodInfo, build_strategy, method_info, register_method

STRATEGIES = {name: info.cls for name, info in METHODS.items()}  # name -> class (kept for callers of 0.x)

__all__ = ["METHODS", "MethodInfo", "ServerContext", "Strategy", "FedAvg", "StaticSparse", "FedDST", "FedMef",
           "PruneFL", "FedTiny", "STRATEGIES", "build_strategy", "method_info", "register_method"]

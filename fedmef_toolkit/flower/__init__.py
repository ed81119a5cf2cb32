"""Run the toolkit's recipes and strategies on Flower (`pip install 'fedmef-toolkit[flower]'`).

- `engine.FlowerEngine`: the server side. The Simulator drives the strategy as
  always (begin_round, client_plan, aggregate, end_round, accounting,
  checkpoints, evaluation, run directory); this engine sends each sampled
  client's model and plan to a Flower SuperNode and collects the results.
- `task.ClientRuntime`: the client side: the same model, the same partition
  (same Dirichlet split for the same seed), the same ClientTrainer and plan.
- `server_app` / `client_app`: Flower's app layout (`flwr run`);
  `simulation.run_in_simulation` is what `fl.engine: flower` uses.
- `codec`: the message layout (also what communication accounting counts).
"""

from __future__ import annotations

from ..errors import UserError

FLOWER_RANGE = ">=1.42,<1.43"
INSTALL_HINT = "pip install 'fedmef-toolkit[flower]'  (flwr" + FLOWER_RANGE + ")"


def require_flower():
    """The flwr module, or a one-line error saying how to install it."""
    try:
        import flwr
    except ImportError:
        raise UserError(f"Flower is not installed: {INSTALL_HINT}") from None
    return flwr

"""`fl.engine: flower` from `fedmef train`: the round's clients through Flower's simulation engine.

The Simulator (built by `fedmef train` as for any engine) runs inside a
ServerApp; Flower's simulation engine runs the ClientApps on its Ray backend
with `fl.flower.supernodes` virtual SuperNodes (default one per client, each
owning its partition) and `fl.flower.client_cpus` / `client_gpus` per
ClientApp (e.g. client_gpus: 1.0 runs one client per GPU at a time).
"""

from __future__ import annotations

import logging
import os

from ..errors import UserError


def backend_config(recipe) -> dict:
    import torch

    f = recipe.fl.flower
    gpus = torch.cuda.device_count()
    return {"client_resources": {"num_cpus": f.client_cpus, "num_gpus": f.client_gpus},
            "init_args": {"num_cpus": max(int(f.client_cpus), os.cpu_count() or 1), "num_gpus": gpus,
                          "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}}


def run_in_simulation(sim, verbose: bool = False) -> list[dict]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import run_on_grid

    recipe = sim.recipe
    nodes = recipe.fl.flower.supernodes or recipe.data.num_clients
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            out["rows"] = run_on_grid(sim, grid, nodes, 600.0)
        except BaseException as exc:  # re-raised in the caller's thread, with its own type
            out["error"] = exc

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(server, client_app, num_supernodes=nodes, backend_config=backend_config(recipe),
                       verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
    if "error" in out:
        raise out["error"]
    if "rows" not in out:
        raise UserError("Flower's simulation engine ended without running the ServerApp (see its log above)")
    return out["rows"]

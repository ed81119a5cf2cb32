"""`fl.engine: flower` from `fedmef train`: the round's clients through Flower's simulation engine.

The Simulator (built by `fedmef train` as for any engine) runs inside a
ServerApp; Flower's simulation engine runs the ClientApps on its Ray backend
with `fl.flower.supernodes` virtual SuperNodes (default one per client, each
owning its partition) and `fl.flower.client_cpus` / `client_gpus` per
ClientApp (e.g. client_gpus: 1.0 runs one client per GPU at a time).

SIGINT and SIGTERM (`fedmef_toolkit.interrupts`): the ServerApp runs in a thread of
Flower's, so the signal handlers only request a stop, which the round loop and the
engine's polling act on in that thread (the last completed round is checkpointed);
Flower then stops its runtime and Ray, and `Interrupted` is raised here. Ray is started
here, before Flower would, so that the handlers can be put back over the one `ray.init`
sets for SIGTERM; it is shut down on every way out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from .. import interrupts
from ..errors import UserError


def backend_config(recipe) -> dict:
    import torch

    f = recipe.fl.flower
    gpus = torch.cuda.device_count()
    return {"client_resources": {"num_cpus": f.client_cpus, "num_gpus": f.client_gpus},
            "init_args": {"num_cpus": max(int(f.client_cpus), os.cpu_count() or 1), "num_gpus": gpus,
                          "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}}


def start_ray(init_args: dict) -> bool:
    """Start Ray as Flower's Ray backend would (its init_args, the driver's sys.path for the
    workers); False where it already runs (Flower then uses it as it is)."""
    import ray

    if ray.is_initialized():
        return False
    args = {"include_dashboard": False, **init_args}
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
    return True


def run_in_simulation(sim, verbose: bool = False) -> list[dict]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import run_on_grid

    recipe = sim.recipe
    nodes = recipe.fl.flower.supernodes or recipe.data.num_clients
    out: dict = {}
    finished = threading.Event()  # the ServerApp's thread has left the run
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        out["started"] = True
        try:
            if out.get("abandoned"):  # the caller has left already (a signal as Flower started)
                raise interrupts.Interrupted(out["abandoned"])
            out["rows"] = run_on_grid(sim, grid, nodes, 600.0)
        except BaseException as exc:  # re-raised in the caller's thread, with its own type
            out["error"] = exc
        finally:
            sim.unlock()  # the run directory is free as soon as its last checkpoint is written
            finished.set()

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    config = backend_config(recipe)
    try:
        with interrupts.stop_on_signals(immediate=False) as guard:
            try:
                start_ray(config["init_args"])
                guard.install()  # ray.init replaced the SIGTERM handler with one that exits
                interrupts.check()
                run_simulation(server, client_app, num_supernodes=nodes, backend_config=config,
                               verbose_logging=verbose)
            except KeyboardInterrupt as exc:  # a second signal, or one before the ServerApp ran
                signum = getattr(exc, "signum", signal.SIGINT)
                interrupts.request(signum)
                out["abandoned"] = signum
                if out.get("started"):  # it stops at its next check, with its checkpoint
                    finished.wait(60)
                raise interrupts.Interrupted(signum) from None
    finally:
        flwr_logger.setLevel(level)
        _stop_ray()
    if "error" in out:
        raise out["error"]
    if "rows" not in out:
        raise UserError("Flower's simulation engine ended without running the ServerApp (see its log above)")
    return out["rows"]


def _stop_ray() -> None:
    """Flower shuts Ray down when its runtime ends; this covers the ways out before or around it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

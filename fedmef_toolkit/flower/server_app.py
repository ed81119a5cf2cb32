"""The Flower ServerApp: the toolkit's Simulator driving a strategy, clients on SuperNodes.

`flwr run` loads it as `fedmef_toolkit.flower.server_app:app`; its run config
(the app's pyproject.toml, `[tool.flwr.app.config]`, or `flwr run --run-config`):

    recipe      recipe file (relative to the app directory) or bundled recipe name
    run-dir     run directory; an existing one with a checkpoint is resumed
    min-nodes   SuperNodes to wait for before round 1 (default 1)
    wait-s      how long to wait for them (default 300)

The run directory is the built-in simulator's: metrics.jsonl, checkpoints,
model.safetensors (`fedmef export` reads it), resumable with the same run-dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

def _resolve(path: str, base: Path | None) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None and (base / p).exists():
        return str(base / p)
    return path


def run_on_grid(sim, grid, min_nodes: int = 1, wait_s: float = 300.0) -> list[dict]:
    """Attach `grid` to the simulator's Flower engine and run the remaining rounds."""
    sim.engine.grid = grid
    sim.engine.wait_for_nodes(min_nodes, wait_s)
    return sim.run()


def make_server_app(app_dir: Path | None = None) -> ServerApp:
    """A ServerApp whose relative recipe path resolves against `app_dir` (the app's directory)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, context, app_dir)

    return server


def main(grid: Grid, context: Context, base: Path | None = None) -> None:
    from ..errors import UserError
    from ..fl.simulator import Simulator
    from ..recipe import load_recipe, load_saved_recipe, recipe_to_yaml
    from ..rundir import RunDir
    from ..storage import write_text_atomic

    cfg = context.run_config
    recipe = load_recipe(_resolve(str(cfg["recipe"]), base), ["fl.engine=flower"])
    run_dir = Path(_resolve(str(cfg.get("run-dir") or f"runs/{recipe.name}-flower"), None)).expanduser()
    resume = run_dir.exists()
    legacy: tuple[str, ...] = ()
    if resume:  # an existing run directory is continued, never written into as a new run
        run = RunDir.open(run_dir)
        recipe, legacy = load_saved_recipe(str(run.recipe))
        if recipe.fl.engine != "flower":
            raise UserError(f"this run trains with fl.engine: {recipe.fl.engine}; continue it with "
                            f"fedmef train --resume {run_dir}", str(run_dir))
    else:
        run_dir = RunDir.create(run_dir.parent, run_dir.name, run_dir.name).path
        write_text_atomic(RunDir(run_dir).recipe, recipe_to_yaml(recipe))
    try:
        sim = Simulator(recipe, run_dir, show_progress=False)
        if resume:
            sim.resume(recipe.digest(without=legacy))
        else:
            sim.write_run_files()
    except BaseException:
        if not resume:  # the directory was created by this call: nothing of an earlier run is in it
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    rows = run_on_grid(sim, grid, int(cfg.get("min-nodes", 1)), float(cfg.get("wait-s", 300)))
    last = next((r for r in reversed(rows) if "eval_acc" in r), None)
    print(f"fedmef: {len(rows)} rounds on Flower; final accuracy "
          f"{'-' if last is None else format(last['eval_acc'], '.4f')}; run dir {run_dir}", flush=True)


app = make_server_app(None)

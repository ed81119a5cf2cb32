"""The Python API of a training run: `fedmef_toolkit.train(...)`.

    import fedmef_toolkit
    result = fedmef_toolkit.train("quickstart_fedmef.yaml", {"fl.rounds": 5})
    result.run_dir, result.metrics[-1]["eval_acc"]

is what `fedmef train` does (a fresh run directory, recipe.yaml, partition.json, the memory
report, metrics.jsonl, checkpoints, model.safetensors) without the console. The pieces are
public too: `Simulator(load_recipe(...), run_dir).run()` with a directory from
`fedmef_toolkit.rundir.RunDir.create`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]  # the rows this call trained (as in metrics.jsonl)


def train(recipe, overrides: dict | list[str] | None = None, run_dir: str | Path | None = None,
          progress: bool = False, resume: bool = False) -> TrainResult:
    """Train `recipe` (a Recipe, a YAML file or a bundled recipe name) with `overrides`
    ({"fl.rounds": 5} or ["fl.rounds=5"]). `run_dir`: where the run goes (must not exist;
    default: a new directory under the recipe's output.dir); with `resume=True`, an existing
    run directory to continue (recipe and overrides are then ignored)."""
    from .fl.simulator import Simulator
    from .memory.report import write_report_for_simulator
    from .recipe import Recipe, load_recipe, load_saved_recipe, recipe_to_yaml
    from .rundir import RECIPE, RunDir
    from .storage import write_text_atomic

    if resume:
        run = RunDir.open(run_dir)
        rec, legacy = load_saved_recipe(str(run.recipe))
        sim = Simulator(rec, run.path, show_progress=progress)
        try:
            sim.resume(rec.digest(without=legacy))
            return TrainResult(run.path, run_rounds(sim))
        finally:
            sim.unlock()
    items = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) else list(overrides or [])
    if isinstance(recipe, Recipe):
        if items:
            raise ValueError("overrides apply to recipe files; change the Recipe object instead")
        rec = recipe
    else:
        rec = load_recipe(str(recipe), items)
    if run_dir is None:
        run = RunDir.create(Path(rec.output.dir).expanduser(), rec.output.name,
                            f"{rec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    else:
        run = RunDir.create(Path(run_dir).parent, Path(run_dir).name, Path(run_dir).name)
    write_text_atomic(run.recipe, recipe_to_yaml(rec))
    assert run.recipe.name == RECIPE
    sim = Simulator(rec, run.path, show_progress=progress)
    try:
        sim.write_run_files()
        if rec.output.memory_report:
            write_report_for_simulator(sim, quiet=True)
        return TrainResult(run.path, run_rounds(sim))
    finally:
        sim.unlock()  # also when something above failed: the run can be resumed in this process


def run_rounds(sim) -> list[dict]:
    """The remaining rounds, on the engine the recipe names (Flower's simulation engine or ours).

    SIGINT and SIGTERM stop the run with a checkpoint of its last completed round
    (`fedmef_toolkit.interrupts`): `interrupts.Interrupted` (a KeyboardInterrupt) is raised
    here, with the signal and its exit code, after the run directory's lock is released and
    Flower's runtime and Ray are shut down."""
    from . import interrupts

    if sim.recipe.fl.engine == "flower":
        from .flower.simulation import run_in_simulation

        return run_in_simulation(sim)  # its own handlers: they must outlive ray.init's
    # abandon the round while its clients train; while the server folds their results into the
    # model, finish it (then the loop stops before the next round): no completed work is lost
    with interrupts.stop_on_signals(immediate=lambda: sim.phase != "server"):
        return sim.run()

"""`fedmef train`: run a recipe in the built-in simulator."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.recipe import load_recipe

from .common import console, err_console, user_errors


def _new_run_dir(recipe) -> Path:
    """Create the run directory; a new run never writes into an existing one. Without
    `output.name` the directory is `<recipe name>-<time>`, with `-2`, `-3`... when two runs
    start in the same second (mkdir is atomic, so concurrent runs cannot share one)."""
    parent = Path(recipe.output.dir).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if recipe.output.name:
            run_dir = parent / recipe.output.name
            try:
                run_dir.mkdir()
            except FileExistsError:
                raise UserError("run directory already exists; continue it with `fedmef train --resume "
                                f"{run_dir}` or pick another output.name", str(run_dir)) from None
            return run_dir
        base = f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        for i in range(1, 1000):
            run_dir = parent / (base if i == 1 else f"{base}-{i}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except OSError as exc:
        raise UserError(f"cannot create the run directory: {exc.strerror or exc}", str(parent)) from None
    raise UserError("too many runs with the same name in this second", str(parent))


def _terminate_as_interrupt(signum, frame):
    """SIGTERM (timeout, SLURM, docker stop) ends a run like Ctrl-C: with a checkpoint."""
    raise KeyboardInterrupt


@click.command()
@click.option("--recipe", "recipe_name", help="Recipe file, or the name of a bundled recipe (e.g. quickstart.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable), e.g. --set fl.rounds=50.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), help="Continue the run in this run directory from its checkpoint.")
@click.option("--no-progress", is_flag=True, help="No live progress bar (metrics still go to metrics.jsonl).")
@user_errors
def train(recipe_name, overrides, resume_dir, no_progress):
    """Train a federated model from a recipe."""
    from fedmef_toolkit.fl.simulator import Simulator

    if resume_dir is not None:
        if recipe_name or overrides:
            raise UserError("--resume takes the recipe saved in the run directory; drop --recipe/--set")
        recipe_file = resume_dir / "recipe.yaml"
        if not recipe_file.is_file():
            raise UserError("not a run directory (no recipe.yaml)", str(resume_dir))
        recipe = load_recipe(str(recipe_file))
        run_dir = resume_dir
    else:
        if not recipe_name:
            raise UserError("give --recipe FILE (or a bundled recipe name), or --resume RUN_DIR")
        recipe = load_recipe(recipe_name, list(overrides))
        run_dir = _new_run_dir(recipe)
    err_console.print(f"[bold]fedmef[/] {recipe.method.name} | {recipe.model.arch}/{recipe.model.norm} | "
                      f"{recipe.data.dataset} | run dir {run_dir}", highlight=False)
    try:
        sim = Simulator(recipe, run_dir, console=err_console, show_progress=not no_progress)
    except BaseException:
        if resume_dir is None and not any(run_dir.iterdir()):
            run_dir.rmdir()  # nothing was written: leave no empty run directory behind
        raise
    if sim.calibration and resume_dir is None:
        f = list(sim.calibration.values())
        err_console.print(f"NSConv gains calibrated on client 0's images: {len(f)} layers, factors "
                          f"{min(f):.2f}..{max(f):.2f}", highlight=False)
    if resume_dir is not None:
        sim.resume()
        err_console.print(f"resuming after round {sim.start_round}", highlight=False)
    else:
        sim.write_run_files()
    if recipe.output.memory_report and resume_dir is None:
        from fedmef_toolkit.memory.report import write_report_for_simulator

        write_report_for_simulator(sim, quiet=True)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        rows = sim.run()
    except KeyboardInterrupt:
        err_console.print(f"interrupted; continue with: fedmef train --resume {run_dir}", highlight=False,
                          soft_wrap=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    from fedmef_toolkit.plots import write_accuracy_curves

    write_accuracy_curves([run_dir], run_dir / "accuracy.png")
    last = next((r for r in reversed(rows) if "eval_acc" in r), None)
    if last:
        console.print(f"final {last.get('eval_split', 'val')} accuracy [bold]{last['eval_acc']:.4f}[/] after round "
                      f"{last['round']}; run dir: {run_dir}", highlight=False)
    else:
        console.print(f"nothing left to train; run dir: {run_dir}", highlight=False)


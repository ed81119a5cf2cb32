"""`fedmef train`: run a recipe in the built-in simulator."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import click
from rich.markup import escape

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.recipe import load_recipe, load_saved_recipe, recipe_to_yaml
from fedmef_toolkit.rundir import RECIPE, RunDir
from fedmef_toolkit.storage import StorageError, write_text_atomic

from .common import console, err_console, user_errors


def _new_run_dir(recipe) -> Path:
    """Create the recipe's run directory (`fedmef_toolkit.rundir.RunDir.create`)."""
    return RunDir.create(Path(recipe.output.dir).expanduser(), recipe.output.name,
                         f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}").path


def _resume_recipe(run: RunDir, overrides: list[str]):
    """(recipe to continue with, the recipe the run was started with, keys its saved recipe
    lacks: see `load_saved_recipe`). Only fl.rounds may change on resume (to extend a finished
    run or shorten an unfinished one)."""
    previous, legacy = load_saved_recipe(str(run.recipe))
    if not overrides:
        return previous, previous, legacy
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    if any(k != "fl.rounds" for k in keys) or not all("=" in o for o in overrides):
        raise UserError("--resume takes the recipe saved in the run directory; only --set fl.rounds=N may change "
                        f"(to train more rounds), got {', '.join(k for k in keys if k != 'fl.rounds') or overrides[0]}")
    return load_saved_recipe(str(run.recipe), list(overrides))[0], previous, legacy


def _stopped_line(exc: KeyboardInterrupt, run_dir: Path) -> str:
    """The one line of a run stopped by Ctrl-C or SIGTERM: the signal, the round its checkpoint
    holds, and the command that continues it."""
    from fedmef_toolkit.fl.checkpoint import load_checkpoint_round

    last = load_checkpoint_round(run_dir)  # None or 0: stopped before round 1 (a resume starts over)
    where = "before round 1" if not last else f"after round {last} (checkpoint saved)"
    return f"stopped by {getattr(exc, 'name', 'SIGINT')} {where}; continue with: fedmef train --resume {run_dir}"


@click.command()
@click.option("--recipe", "recipe_name", help="Recipe file, or the name of a bundled recipe (e.g. quickstart.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable), e.g. --set fl.rounds=50.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), help="Continue the run in this run directory from its checkpoint.")
@click.option("--no-progress", is_flag=True, help="No live progress bar (metrics still go to metrics.jsonl).")
@user_errors
def train(recipe_name, overrides, resume_dir, no_progress):
    """Train a federated model from a recipe."""
    from fedmef_toolkit.fl.simulator import Simulator

    previous = None
    if resume_dir is not None:
        if recipe_name:
            raise UserError("--resume takes the recipe saved in the run directory; drop --recipe")
        recipe, previous, legacy = _resume_recipe(RunDir.open(resume_dir), list(overrides))
        run_dir = resume_dir
    else:
        if not recipe_name:
            raise UserError("give --recipe FILE (or a bundled recipe name), or --resume RUN_DIR")
        recipe = load_recipe(recipe_name, list(overrides))
        run_dir = _new_run_dir(recipe)
        try:  # first, so that a run killed from here on can be resumed
            write_text_atomic(run_dir / RECIPE, recipe_to_yaml(recipe))
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    model = f"model.init {recipe.model.init}" if recipe.model.init else f"{recipe.model.arch}/{recipe.model.norm}"
    err_console.print(f"[bold]fedmef[/] {recipe.method.name} | {escape(model)} | "
                      f"{recipe.data.dataset} | run dir {escape(str(run_dir))}", highlight=False, soft_wrap=True)
    try:
        sim = Simulator(recipe, run_dir, console=err_console, show_progress=not no_progress)
    except BaseException:
        if resume_dir is None and {p.name for p in run_dir.iterdir()} <= {RECIPE}:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing was run: leave no run directory behind
        raise
    if sim.built.init:
        n = sum(p.numel() for p in sim.model.parameters())
        err_console.print(f"model: {escape(sim.built.label)} ({n:,} parameters; model.arch/norm/width are not used)",
                          highlight=False, soft_wrap=True)
    if sim.calibration and resume_dir is None:
        f = list(sim.calibration.values())
        err_console.print(f"NSConv gains calibrated on client 0's images: {len(f)} layers, factors "
                          f"{min(f):.2f}..{max(f):.2f}", highlight=False)
    if resume_dir is not None:
        sim.resume(previous.digest(without=legacy))
        if recipe is not previous:
            if sim.start_round > recipe.fl.rounds:
                raise UserError(f"the run is at round {sim.start_round}; fl.rounds={recipe.fl.rounds} cannot end it "
                                "earlier", str(run_dir))
            write_text_atomic(run_dir / RECIPE, sim.recipe_text())  # later resumes continue to the new end
            note = (f"; the {recipe.fl.lr_schedule} lr schedule now spans {recipe.fl.rounds} rounds"
                    if recipe.fl.lr_schedule != "constant" else "")
            err_console.print(f"fl.rounds {previous.fl.rounds} -> {recipe.fl.rounds}{note}", highlight=False)
        err_console.print(f"resuming after round {sim.start_round}", highlight=False)
    else:
        try:
            sim.write_run_files()
            if recipe.output.memory_report:
                from fedmef_toolkit.memory.report import write_report_for_simulator

                write_report_for_simulator(sim, quiet=True)
        except BaseException:  # e.g. a full disk: the new, still empty run leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    from fedmef_toolkit.training import run_rounds

    try:  # SIGINT and SIGTERM (timeout, SLURM, docker stop): a checkpoint of the last round, exit 128+signal
        rows = run_rounds(sim)  # the built-in simulator, or the same Simulator on Flower's simulation engine
    except StorageError as exc:  # nothing written is damaged: the last checkpoint stands
        raise StorageError(f"{exc}; the last checkpoint is intact: fix this and continue with "
                           f"fedmef train --resume {run_dir}") from None
    except KeyboardInterrupt as exc:
        err_console.print(escape(_stopped_line(exc, run_dir)), highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 130))
    from fedmef_toolkit.plots import write_accuracy_curves

    write_accuracy_curves([run_dir], RunDir(run_dir).accuracy_png)
    last = next((r for r in reversed(rows) if "eval_acc" in r), None)
    if last:
        console.print(f"final {last.get('eval_split', 'val')} accuracy [bold]{last['eval_acc']:.4f}[/] after round "
                      f"{last['round']}; run dir: {run_dir}", highlight=False)
    else:
        console.print(f"nothing left to train; run dir: {run_dir}", highlight=False)


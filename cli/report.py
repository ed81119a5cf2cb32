"""`fedmef report`: memory footprint of one client training step."""

from __future__ import annotations

from pathlib import Path

import click

from fedmef_toolkit.recipe import load_recipe, load_saved_recipe

from .common import console, user_errors


@click.command()
@click.argument("target")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (recipe targets).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Where memory.json / memory.png go (default: the run directory, or .).")
@click.option("--device", default=None, help="Measure on this device instead of the recipe's.")
@click.option("--json", "as_json", is_flag=True, help="Print memory.json to stdout instead of the table.")
@user_errors
def report(target, overrides, out_dir, device, as_json):
    """Memory report for a run directory (RUN_DIR) or a recipe (file or bundled name).

    Measures saved activations with saved-tensor hooks (and the step peak on CUDA)
    for the model the recipe trains and for a reference (same model, BatchNorm, no SAP).
    A recipe needs no data set on disk (CIFAR-10, CINIC-10, Tiny ImageNet and synthetic
    data fix the classes and image size); a run directory is measured with its own model.
    """
    import copy
    import json

    from fedmef_toolkit.assembly import dataset_shape
    from fedmef_toolkit.fl.simulator import resolve_device
    from fedmef_toolkit.memory.report import render_table, report_for_recipe, write_report
    from fedmef_toolkit.rundir import MEMORY_JSON, RunDir

    path = Path(target)
    subject = description = None
    if path.is_dir():
        run = RunDir.open(path)
        recipe = load_saved_recipe(str(run.recipe), list(overrides), need_data=False)[0]
        out_dir = out_dir or path
        num_classes, image_size = _run_shape(run, recipe)
        if (run.model.exists() or run.checkpoint.exists()) and not overrides:
            subject, description = _run_model(run, recipe)
    else:
        recipe = load_recipe(target, list(overrides), need_data=False)
        out_dir = out_dir or Path(".")
        num_classes, image_size = dataset_shape(recipe.data, recipe.seed)
    dev = resolve_device(device or recipe.device)
    rep = report_for_recipe(recipe, num_classes, image_size, dev,
                            None if subject is None else (lambda: copy.deepcopy(subject)), description)
    write_report(rep, out_dir)
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        render_table(rep, console)
        console.print(f"wrote {out_dir / MEMORY_JSON}", highlight=False)


def _run_shape(run, recipe) -> tuple[int, int]:
    """Classes and image size of a run without decoding its data set: its partition.json
    knows the classes; the data set kind the image size."""
    import json

    from fedmef_toolkit.assembly import KNOWN_SHAPES, dataset_shape

    d = recipe.data
    if d.dataset in KNOWN_SHAPES or d.dataset == "synthetic":
        return dataset_shape(d)
    if run.partition.is_file():
        return len(json.loads(run.partition.read_text())["classes"]), 32
    return dataset_shape(d, recipe.seed)


def _run_model(run, recipe):
    """The run's newest model (final, else checkpoint) with its masks, plus the recipe's SAP."""
    from fedmef_toolkit.export.api import read_source
    from fedmef_toolkit.architecture import model_from_state

    state, desc, _ = read_source(run.path)
    model = model_from_state(desc, state, str(run.model_source()))
    if recipe.method.sap.enabled:
        from fedmef_toolkit.sap import enable_sap

        enable_sap(model, recipe.method.sap.gamma, recipe.method.sap.selection)
    return model, desc

"""`fedmef report`: memory footprint of one client training step."""

from __future__ import annotations

from pathlib import Path

import click

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.recipe import load_recipe

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
    for the recipe's model and for a reference (same model, BatchNorm, no SAP).
    """
    import json

    from fedmef_toolkit.fl.simulator import resolve_device
    from fedmef_toolkit.memory.report import render_table, report_for_recipe, write_report

    path = Path(target)
    if path.is_dir():
        if not (path / "recipe.yaml").is_file():
            raise UserError("not a run directory (no recipe.yaml)", str(path))
        recipe = load_recipe(str(path / "recipe.yaml"), list(overrides))
        out_dir = out_dir or path
    else:
        recipe = load_recipe(target, list(overrides))
        out_dir = out_dir or Path(".")
    num_classes, image_size = _shape_of(recipe, path if path.is_dir() else None)
    dev = resolve_device(device or recipe.device)
    rep = report_for_recipe(recipe, num_classes, image_size, dev)
    write_report(rep, out_dir)
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        render_table(rep, console)
        console.print(f"wrote {out_dir / 'memory.json'}", highlight=False)


def _shape_of(recipe, run_dir: Path | None) -> tuple[int, int]:
    """Classes and image size without decoding the data set: the run's partition.json
    knows the classes; image folders are measured at 32x32 (CIFAR/CINIC-sized)."""
    import json

    d = recipe.data
    if d.dataset == "synthetic":
        return d.synthetic.num_classes, d.synthetic.image_size
    size = 64 if d.dataset == "tinyimagenet" else 32
    if run_dir is not None and (run_dir / "partition.json").is_file():
        return len(json.loads((run_dir / "partition.json").read_text())["classes"]), size
    return (200 if d.dataset == "tinyimagenet" else 10), size

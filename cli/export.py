"""`fedmef export`, `fedmef inspect` and `fedmef eval`: ship and check a trained model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch
from rich.markup import escape
from rich.table import Table

from fedmef_toolkit.errors import UserError, brief

from .common import console, err_console, user_errors


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["sparse-safetensors", "safetensors"]), default="sparse-safetensors", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="Dtype of stored values.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output file (default: <run>/model.sparse.safetensors or model.dense.safetensors).")
@user_errors
def export(source, fmt, dtype, out):
    """Export the model of a run directory or checkpoint (SOURCE)."""
    from fedmef_toolkit.export.api import export_model
    from fedmef_toolkit.rundir import RunDir

    if not source.exists():
        raise UserError("not found", str(source))
    base = RunDir(source if source.is_dir() else source.parent)
    out = out or base.export_path(fmt)
    if out.resolve() in {(source if source.is_file() else base.model).resolve(), base.checkpoint.resolve()}:
        raise UserError("the output would replace the source; give another -o", str(out))
    t0 = time.perf_counter()
    s = export_model(source, out, fmt, dtype)
    dt = time.perf_counter() - t0
    console.print(f"wrote {out}: {s['tensors']} tensors ({s['csr']} CSR), density {s['density']:.4f}, "
                  f"{s['bytes'] / 2**20:.2f} MiB vs {s['dense_value_bytes'] / 2**20:.2f} MiB dense "
                  f"({s['bytes'] / max(1, s['dense_value_bytes']):.3f}x) in {dt:.2f} s", highlight=False)
    if s["warning"]:
        err_console.print(f"[bold yellow]warning:[/] {s['warning']}", highlight=False)


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def inspect(file, as_json):
    """Show what is in an exported (or any safetensors) model FILE."""
    from fedmef_toolkit.export.api import inspect_file

    info = inspect_file(file)
    if as_json:  # metadata values that hold JSON (layout, provenance, ...) become JSON, numbers numbers
        click.echo(json.dumps({**info, "metadata": {k: _json_value(k, v) for k, v in info["metadata"].items()}},
                              indent=1))
        return
    table = Table(title=escape(f"{file} ({info['bytes'] / 2**20:.2f} MiB)"))
    for col in ["tensor", "layout", "shape", "dtype", "density", "bytes"]:
        table.add_column(col, justify="right" if col in ("density", "bytes") else "left")
    for r in info["tensors"]:  # names and metadata come from the file: never rich markup
        table.add_row(escape(r["name"]), r["layout"], "x".join(map(str, r["shape"])), r["stored_dtype"],
                      f"{r['density']:.3f}", f"{r['bytes']:,}")
    console.print(table)
    console.print(f"[bold]content hash[/]: {info['hash']}"
                  + (" (written before content hashes; not checked)" if info["hash"] == "absent" else ""),
                  highlight=False)
    for key, value in info["metadata"].items():
        if key != "layout":
            console.print(f"[bold]{escape(key)}[/]: {escape(value)}", highlight=False, soft_wrap=True)


_JSON_METADATA = {"layout", "provenance", "fedmef_arch", "fedmef_checkpoint_state"}
_NUMBER_METADATA = {"round", "val_accuracy", "format_version"}


def _json_value(key: str, text: str):
    """A metadata value as JSON: the entries that hold JSON documents become objects and the
    numeric ones numbers ('15' -> 15; '' -> null); the rest (digests, names) stay strings."""
    try:
        if key in _JSON_METADATA:
            return json.loads(text)
        if key in _NUMBER_METADATA:
            return None if text == "" else json.loads(text)
    except (ValueError, RecursionError, TypeError):
        pass
    return text


@click.command(name="eval")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_name", help="Take the data set settings from this recipe (e.g. a run's recipe.yaml).")
@click.option("--dataset", type=click.Choice(["synthetic", "cifar10", "cinic10", "imagefolder", "tinyimagenet"]))
@click.option("--root", help="Data set directory or archive.")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@click.option("--val-split", default=0.1, show_default=True, help="Held-out fraction when the data set has no validation split.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=512, show_default=True)
@user_errors
def eval_cmd(file, recipe_name, dataset, root, split, val_split, device, batch_size):
    """Evaluate an exported model FILE on a data set (--recipe, or --dataset/--root)."""
    from fedmef_toolkit.data import load_data
    from fedmef_toolkit.data.augment import DeviceAugment
    from fedmef_toolkit.export.api import load_model
    from fedmef_toolkit.fl.evaluate import evaluate
    from fedmef_toolkit.fl.simulator import resolve_device
    from fedmef_toolkit.recipe import DataSpec

    if recipe_name:
        from fedmef_toolkit.recipe import load_recipe

        recipe = load_recipe(recipe_name)
        spec, seed = recipe.data, recipe.seed
    elif dataset:
        if dataset != "synthetic" and not root:
            raise UserError(f"--root is required for --dataset {dataset}")
        spec, seed = DataSpec(dataset=dataset, root=root, val_split=val_split), 0
    else:
        raise UserError("give --recipe, or --dataset (and --root)")
    if not 1 <= batch_size <= 65_536:
        raise UserError(f"--batch-size must be from 1 to 65536, got {batch_size}")
    if not 0.0 < val_split <= 0.9:
        raise UserError(f"--val-split must be in (0, 0.9], got {val_split}")
    dev = resolve_device(device)
    model = load_model(file, dev)
    data = load_data(spec, split, seed)
    try:
        with torch.no_grad():
            outputs = model(data.eval_x[:1].to(dev).float()).shape[-1]
    except RuntimeError as exc:
        raise UserError(f"the model cannot run on this data set's images ({brief(exc)})", str(file)) from None
    if outputs != data.num_classes:
        raise UserError(f"the model has {outputs} outputs but the data set has {data.num_classes} classes", str(file))
    mean, std = data.channel_stats()
    aug = DeviceAugment(mean, std).to(dev)
    acc, loss = evaluate(model, data.eval_x.to(dev), data.eval_y.to(dev), aug.normalize, batch_size)
    console.print(f"{data.eval_name} accuracy [bold]{acc:.4f}[/] (loss {loss:.4f}) on {len(data.eval_y)} images", highlight=False)

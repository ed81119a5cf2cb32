"""`fedmef convert`: BN CNN -> BN-free NSConv network."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .common import console, user_errors


@click.command()
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output .safetensors (default: <input>_nsconv.safetensors).")
@click.option("--arch", help="Architecture of a state-dict input: a registry name (resnet18, mobilenetv2, cnn4) or a torchvision name (resnet50, mobilenet_v2, vgg11_bn; prefix torchvision. to force it).")
@click.option("--image-size", default=32, show_default=True, help="Input size the registry model was built for (32 or 64).")
@click.option("--trust-pickle", is_flag=True, help="Allow a whole pickled nn.Module. Unpickling can run arbitrary code: only for files you trust.")
@click.option("--stats", type=click.Choice(["active", "all"]), default="active", show_default=True, help="NSConv statistics variant.")
@user_errors
def convert(model_file, out, arch, image_size, trust_pickle, stats):
    """Convert MODEL_FILE (state dict .pt/.pth, safetensors, or --trust-pickle module) to NSConv."""
    from fedmef_toolkit.convert import convert_file

    out = out or model_file.with_name(model_file.stem + "_nsconv.safetensors")
    report, desc = convert_file(model_file, out, arch, trust_pickle, image_size, {"stats": stats})
    src = desc["source"]
    table = Table(title=f"converted {model_file.name} -> {out.name}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("architecture", "pickled module" if src is None else f"{src['source']} {src['name']}")
    table.add_row("conv layers -> NSConv", str(len(report.converted)))
    table.add_row("BatchNorm layers folded and removed", str(len(report.folded_bn)))
    table.add_row("parameters before", f"{report.params_before:,}")
    table.add_row("parameters after", f"{report.params_after:,}")
    if report.relative_output_error is not None:
        table.add_row("output change (relative)", f"{report.relative_output_error:.3g}")
        table.add_row("output change (max abs)", f"{report.max_abs_output_error:.3g}")
    console.print(table)
    if report.relative_output_error is not None:
        console.print(f"The converted model's outputs differ from the original's by {report.relative_output_error:.3g} "
                      f"(relative, on {report.sample_inputs}): folding BatchNorm into a standardised conv is exact "
                      "only for zero-mean filters. Fine-tune it before use.", highlight=False)
    if src is None:
        console.print(f"wrote {out}. It was converted from a pickled module, so it cannot be rebuilt from the file "
                      "alone and `model.init` cannot train it: save the module's state_dict and convert that with "
                      "--arch, or load it in Python with the original class.", highlight=False)
    else:
        console.print(f"wrote {out}; fine-tune it with `fedmef train --recipe RECIPE --set model.init={out}`",
                      highlight=False)

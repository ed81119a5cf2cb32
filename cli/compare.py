"""`fedmef compare`: runs side by side (table, Markdown, CSV and two PNGs)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import console, user_errors


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Where compare.md, compare.csv, compare_accuracy.png and compare_resources.png go.")
@user_errors
def compare(run_dirs, out_dir):
    """Compare training runs (RUN_DIR...): accuracy, communication, client memory, time.

    Runs of different data sets or models are grouped, never mixed. Client memory is
    read from each run's memory.json (written at the start of training).
    """
    from fedmef_toolkit.compare import (comparison_rows, csv_table, load_run, markdown_table, render_table,
                                        write_accuracy_png, write_resources_png)
    from fedmef_toolkit.storage import io_error, write_text_atomic

    runs = [load_run(p) for p in run_dirs]
    header, rows = comparison_rows(runs)
    render_table(header, rows, console)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, out_dir, "cannot create the output directory") from None
    write_text_atomic(out_dir / "compare.md", markdown_table(header, rows))
    write_text_atomic(out_dir / "compare.csv", csv_table(header, rows))
    written = ["compare.md", "compare.csv"]
    if write_accuracy_png(runs, out_dir / "compare_accuracy.png"):
        write_resources_png(runs, out_dir / "compare_resources.png")
        written += ["compare_accuracy.png", "compare_resources.png"]
    else:
        console.print("plots need matplotlib: pip install 'fedmef-toolkit[plot]'", highlight=False)
    console.print(f"wrote {', '.join(written)} in {out_dir}", highlight=False)

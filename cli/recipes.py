"""`fedmef recipes`: list bundled recipes, show one, or print the recipe reference."""

from __future__ import annotations

import textwrap

import click

from fedmef_toolkit.recipe import bundled_recipe_names, describe_fields, resolve_recipe_path

from .common import user_errors


def reference_text(width: int = 80) -> str:
    """Every recipe key, one entry per key: `key: type = default` on its own line (never cut),
    then its meaning and range wrapped below it, so it reads at any terminal width."""
    from fedmef_toolkit.fl.strategies import METHODS

    width = max(40, width)
    lines = ["methods (method.name):"]
    for info in METHODS.values():
        section = f" [method.{info.section}]" if info.section else ""
        lines += textwrap.wrap(f"{info.name}{section}: {info.summary}", width - 2, initial_indent="  ",
                               subsequent_indent="      ")
    lines += ["", "keys:"]
    for key, tp, default, text in describe_fields():
        lines.append(f"{key}: {tp} = {default!r}")
        if text:
            lines += textwrap.wrap(text, width - 4, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


@click.command()
@click.argument("name", required=False)
@click.option("--reference", is_flag=True, help="Print every recipe key with its type, default and range.")
@user_errors
def recipes(name, reference):
    """List bundled recipes, or print one (NAME) or the recipe reference."""
    if reference:
        import shutil

        click.echo(reference_text(min(100, shutil.get_terminal_size((80, 24)).columns)))
    elif name:
        _, text = resolve_recipe_path(name)
        click.echo(text)
    else:
        for n in bundled_recipe_names():
            click.echo(n)

"""`fedmef recipes`: list bundled recipes, show one, or print the recipe reference."""

from __future__ import annotations

import click
from rich.table import Table

from fedmef_toolkit.recipe import bundled_recipe_names, describe_fields, resolve_recipe_path

from .common import console, user_errors


@click.command()
@click.argument("name", required=False)
@click.option("--reference", is_flag=True, help="Print every recipe key with its type, default and range.")
@user_errors
def recipes(name, reference):
    """List bundled recipes, or print one (NAME) or the recipe reference."""
    if reference:
        from fedmef_toolkit.fl.strategies import METHODS

        methods = Table("method.name", "recipe section", "what it is", title="methods")
        for info in METHODS.values():
            methods.add_row(info.name, f"method.{info.section}" if info.section else "-", info.summary)
        console.print(methods)
        table = Table("key", "type", "default", "meaning")
        for key, tp, default, text in describe_fields():
            table.add_row(key, tp, repr(default), text)
        console.print(table)
    elif name:
        _, text = resolve_recipe_path(name)
        click.echo(text)
    else:
        for n in bundled_recipe_names():
            click.echo(n)

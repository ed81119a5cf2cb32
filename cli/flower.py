"""`fedmef flower app`: a recipe as a Flower app directory (`flwr run`)."""

from __future__ import annotations

from pathlib import Path

import click

from fedmef_toolkit.recipe import load_recipe

from .common import console, user_errors


@click.group()
def flower():
    """Run recipes on Flower (SuperLink + SuperNodes); needs fedmef-toolkit[flower]."""


@flower.command("app")
@click.argument("recipe_name", metavar="RECIPE")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="New app directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable).")
@click.option("--superlink", default="127.0.0.1:9093", show_default=True,
              help="Control API address of a remote SuperLink (the fedmef-remote connection, TLS).")
@click.option("--root-cert", default=None, help="CA certificate for the remote SuperLink's TLS.")
@click.option("--min-nodes", default=2, show_default=True, help="SuperNodes to wait for before round 1.")
@user_errors
def app_cmd(recipe_name, out, overrides, superlink, root_cert, min_nodes):
    """Write a Flower app directory that runs RECIPE with `flwr run`."""
    from fedmef_toolkit.flower.app_dir import write_app

    recipe = load_recipe(recipe_name, list(overrides) + ["fl.engine=flower"])
    path = write_app(recipe, out, superlink, root_cert, min_nodes)
    console.print(f"Flower app written to {path}\n"
                  f"  export FLWR_HOME={(path / 'flwr_home').resolve()}\n"
                  f"  flwr run {path} fedmef-sim     # simulation\n"
                  f"  flwr run {path} fedmef-local   # SuperLink + SuperNodes on this host (docs/flower.md)",
                  highlight=False, soft_wrap=True)

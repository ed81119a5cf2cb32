"""Entry point of the `fedmef` console script."""

from __future__ import annotations

import click

from fedmef_toolkit import __version__

from .compare import compare
from .convert import convert
from .export import eval_cmd, export, inspect
from .flower import flower
from .recipes import recipes
from .report import report
from .train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedmef")
def main():
    """fedmef-toolkit: memory-efficient federated dynamic pruning (FedMef and baselines)."""


main.add_command(train)
main.add_command(convert)
main.add_command(export)
main.add_command(inspect)
main.add_command(eval_cmd)
main.add_command(recipes)
main.add_command(report)
main.add_command(compare)
main.add_command(flower)

if __name__ == "__main__":
    main()

"""Shared CLI plumbing: one-line errors with exit code 2, a console."""

from __future__ import annotations

import functools
import sys

from rich.console import Console

from fedmef_toolkit.errors import UserError

console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn UserError into 'error: <message>' on stderr and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            sys.exit(130)

    return wrapper

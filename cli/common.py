"""Shared CLI plumbing: one-line errors (exit code 2 for bad input, 1 for I/O failures), a console."""

from __future__ import annotations

import functools
import sys

from rich.console import Console
from rich.markup import escape

from fedmef_toolkit.errors import UserError, brief

console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn UserError into 'error: <message>' on stderr and its exit code (2, or 1 for I/O
    failures), no traceback. An OSError that escaped the toolkit's own handling (a full disk
    while a plot is written, say) is one line naming the path, exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            err_console.print(f"[bold red]error:[/] {escape(where + (exc.strerror or brief(exc)))}", highlight=False,
                              soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:  # fedmef_toolkit.interrupts.Interrupted carries its signal
            err_console.print("interrupted", highlight=False)
            sys.exit(getattr(exc, "exit_code", 130))

    return wrapper

"""Typed recipe fields: a dataclass field with its validation range or choices.

Shared by the recipe (recipe.py) and by each federated method, whose recipe
section is a dataclass declared beside its strategy (fl/strategies/).
"""

from __future__ import annotations

from dataclasses import field


def spec_field(default, *, lo=None, hi=None, lo_open=False, choices=None, help=""):
    """A recipe field with its validation range or choices."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)

"""A regular (non-editable) install ships every subpackage of the library."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_library_subpackage_is_listed_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(fedmef_toolkit(?:\.[a-z_]+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fedmef_toolkit").rglob("__init__.py")}
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"

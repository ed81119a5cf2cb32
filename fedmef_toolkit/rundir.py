"""The run directory: its file names and the metadata keys of the files in it, in one place.

    runs/<name>/recipe.yaml              resolved recipe (RECIPE)
    runs/<name>/partition.json           client sizes and class histograms (PARTITION)
    runs/<name>/metrics.jsonl            one JSON line per round (METRICS), only appended
    runs/<name>/checkpoint.safetensors   resumable state (CHECKPOINT; + CHECKPOINT_STATE, a copy)
    runs/<name>/model.safetensors        final global model with masks (MODEL)
    runs/<name>/memory.json, memory.png  memory report (MEMORY_JSON, MEMORY_PNG)
    runs/<name>/accuracy.png             accuracy curves (ACCURACY_PNG)
    runs/<name>/model.sparse.safetensors, model.dense.safetensors   default export targets

Every write goes through `fedmef_toolkit.storage` (atomic replacement, content hashes, fault
hook); `RunDir.create` makes a fresh directory that no other run uses (`storage.new_run_dir`),
`RunDir.open` checks that a path is a run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .storage import HASH_KEY, new_run_dir  # noqa: F401  (HASH_KEY re-exported: one list of keys)

RECIPE = "recipe.yaml"
PARTITION = "partition.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
MODEL = "model.safetensors"
MEMORY_JSON = "memory.json"
MEMORY_PNG = "memory.png"
ACCURACY_PNG = "accuracy.png"
LOCK = ".lock"  # held (flock) by the process that writes the run
EXPORTS = {"sparse-safetensors": "model.sparse.safetensors", "safetensors": "model.dense.safetensors"}

# metadata keys of the safetensors files a run writes
ARCH_KEY = "fedmef_arch"  # JSON architecture description (fedmef_toolkit.architecture)
FORMAT_KEY = "format"  # "fedmef-dense" | "fedmef-sparse"
ROUND_KEY = "round"
RECIPE_DIGEST_KEY = "recipe_digest"
VAL_ACCURACY_KEY = "val_accuracy"
VERSION_KEY = "toolkit_version"
CHECKPOINT_STATE_KEY = "fedmef_checkpoint_state"  # JSON {round, totals, recipe_digest, version}
PROVENANCE_KEY = "provenance"
LAYOUT_KEY = "layout"
DENSE_FORMAT = "fedmef-dense"


class RunDir:
    """Paths of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    recipe = property(lambda self: self.path / RECIPE)
    partition = property(lambda self: self.path / PARTITION)
    metrics = property(lambda self: self.path / METRICS)
    checkpoint = property(lambda self: self.path / CHECKPOINT)
    checkpoint_state = property(lambda self: self.path / CHECKPOINT_STATE)
    model = property(lambda self: self.path / MODEL)
    memory_json = property(lambda self: self.path / MEMORY_JSON)
    memory_png = property(lambda self: self.path / MEMORY_PNG)
    accuracy_png = property(lambda self: self.path / ACCURACY_PNG)

    def export_path(self, fmt: str) -> Path:
        return self.path / EXPORTS[fmt]

    @staticmethod
    def is_run_dir(path: str | Path) -> bool:
        return Path(path).is_dir() and (Path(path) / RECIPE).is_file()

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory (one with recipe.yaml), or a one-line UserError."""
        path = Path(path)
        if not path.is_dir():
            raise UserError("not a run directory (not a folder)", str(path))
        if not (path / RECIPE).is_file():
            raise UserError(f"not a run directory (no {RECIPE}; a run killed as it was created has none: "
                            "remove it and start again)", str(path))
        return cls(path)

    @classmethod
    def create(cls, parent: Path, name: str | None, default_base: str) -> "RunDir":
        """A new directory that belongs to this run alone (`storage.new_run_dir`)."""
        return cls(new_run_dir(Path(parent), name, default_base))

    def model_source(self) -> Path:
        """The newest weights of the run: the final model, else the checkpoint."""
        if self.model.exists():
            return self.model
        if self.checkpoint.exists():
            return self.checkpoint
        raise UserError(f"no {MODEL} or {CHECKPOINT} in this run directory", str(self.path))

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.jsonl (a torn last line, from a kill mid-write, is skipped)."""
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

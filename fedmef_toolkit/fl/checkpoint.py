"""Resumable checkpoints of a run: global model, strategy state and counters.

A checkpoint is one file, replaced atomically: the tensors and the JSON state
(round, totals, recipe digest) travel together in `checkpoint.safetensors`
(the state in its metadata), so a run killed at any moment leaves either the
old checkpoint or the new one, never weights of one round under the number of
another. `checkpoint.json` is a readable copy of the state, written after; it
is not read back when the safetensors file carries the state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError

CKPT = "checkpoint.safetensors"
CKPT_STATE = "checkpoint.json"


STATE_KEY = "fedmef_checkpoint_state"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk, then rename it over `path` (and flush the directory entry)."""
    _fsync(tmp)
    os.replace(tmp, path)
    try:
        _fsync(path.parent)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _replace_durably(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a text file so that a kill leaves the old content or the new, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _replace_durably(tmp, path)


def save_checkpoint(run_dir: Path, model_state: dict, strategy_tensors: dict, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"strategy.{k}": v for k, v in strategy_tensors.items()})
    _atomic_save(tensors, run_dir / CKPT, {STATE_KEY: json.dumps(state)})
    write_text_atomic(run_dir / CKPT_STATE, json.dumps(state, indent=1))


def _state_from_metadata(meta: dict | None) -> dict | None:
    return json.loads(meta[STATE_KEY]) if meta and STATE_KEY in meta else None


def load_checkpoint(run_dir: Path) -> tuple[dict, dict, dict]:
    path, spath = run_dir / CKPT, run_dir / CKPT_STATE
    if not path.exists():
        raise UserError("no checkpoint to resume from (checkpoint.safetensors)", str(run_dir))
    try:
        with safe_open(str(path), framework="pt") as f:  # tensors and state in one read
            state = _state_from_metadata(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if state is None:
            if not spath.exists():
                raise UserError("checkpoint has no state (round, totals) and checkpoint.json is missing", str(path))
            state = json.loads(spath.read_text())  # written by an earlier version: state beside the tensors
        int(state["round"])
    except UserError:
        raise
    except Exception as exc:  # corrupt file of any kind
        raise UserError(f"cannot read checkpoint: {exc}", str(path)) from None
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    strat = {k[9:]: v for k, v in tensors.items() if k.startswith("strategy.")}
    return model, strat, state


def load_checkpoint_round(run_dir: Path) -> int | None:
    """The round of the run's checkpoint, read from its metadata only (None if unreadable)."""
    try:
        with safe_open(str(run_dir / CKPT), framework="pt") as f:
            return int(_state_from_metadata(f.metadata())["round"])
    except Exception:
        return None


def save_model(path: Path, model_state: dict, metadata: dict) -> None:
    _atomic_save(dict(model_state), path, {k: str(v) for k, v in metadata.items()})

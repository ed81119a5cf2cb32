"""Resumable checkpoints of a run: global model, strategy state and counters.

A checkpoint is one file, replaced atomically: the tensors and the JSON state
(round, totals, recipe digest) travel together in `checkpoint.safetensors`
(the state in its metadata, with a content hash over all of it, checked on
`--resume`), so a run killed at any moment leaves either the old checkpoint or
the new one, never weights of one round under the number of another. Writing
goes through `fedmef_toolkit.storage`. `checkpoint.json` is a readable copy of
the state, written after; it is not read back when the safetensors file
carries the state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError, brief
from ..rundir import ARCH_KEY, CHECKPOINT as CKPT, CHECKPOINT_STATE as CKPT_STATE, CHECKPOINT_STATE_KEY as STATE_KEY
from ..storage import read_safetensors_verified, save_safetensors, write_text_atomic


def save_checkpoint(run_dir: Path, model_state: dict, strategy_tensors: dict, state: dict,
                    arch: dict | None = None) -> None:
    """`arch`: the model's architecture description, so that a run with only a checkpoint
    can be exported and evaluated."""
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"strategy.{k}": v for k, v in strategy_tensors.items()})
    meta = {STATE_KEY: json.dumps(state)}
    if arch is not None:
        meta[ARCH_KEY] = json.dumps(arch)
    save_safetensors(run_dir / CKPT, tensors, meta)
    write_text_atomic(run_dir / CKPT_STATE, json.dumps(state, indent=1))


def _state_from_metadata(meta: dict | None) -> dict | None:
    return json.loads(meta[STATE_KEY]) if meta and STATE_KEY in meta else None


def _check_state(state) -> None:
    if not isinstance(state, dict) or not isinstance(state.get("totals"), dict):
        raise ValueError("not a mapping with 'round' and 'totals'")
    if not isinstance(state.get("round"), int) or not 0 <= state["round"] <= 10**7:
        raise ValueError(f"round {state.get('round')!r} is not a round number")
    for key in ("bytes_up", "bytes_down", "samples", "time_s"):
        if not isinstance(state["totals"].get(key), (int, float)):
            raise ValueError(f"totals.{key} is missing or not a number")


def load_checkpoint(run_dir: Path) -> tuple[dict, dict, dict]:
    path, spath = run_dir / CKPT, run_dir / CKPT_STATE
    if not path.exists():
        raise UserError("no checkpoint to resume from (checkpoint.safetensors)", str(run_dir))
    try:
        tensors, meta, _ = read_safetensors_verified(path)  # tensors and state in one read, hash checked
        state = _state_from_metadata(meta)
        if state is None:
            if not spath.exists():
                raise UserError("checkpoint has no state (round, totals) and checkpoint.json is missing", str(path))
            state = json.loads(spath.read_text())  # written by an earlier version: state beside the tensors
        _check_state(state)
    except UserError as exc:
        raise type(exc)(f"cannot resume: {exc}") from None
    except Exception as exc:  # corrupt state of any kind
        raise UserError(f"cannot resume: checkpoint state is corrupt ({brief(exc)})", str(path)) from None
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    strat = {k[9:]: v for k, v in tensors.items() if k.startswith("strategy.")}
    return model, strat, state


def load_checkpoint_round(run_dir: Path) -> int | None:
    """The round of the run's checkpoint, read from its metadata only (None if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / CKPT), framework="pt") as f:
            return int(_state_from_metadata(f.metadata())["round"])
    except Exception:
        return None


def save_model(path: Path, model_state: dict, metadata: dict) -> None:
    save_safetensors(path, dict(model_state), metadata)

"""Resumable checkpoints of a run: global model, strategy state and counters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

CKPT = "checkpoint.safetensors"
CKPT_STATE = "checkpoint.json"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model_state: dict, strategy_tensors: dict, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"strategy.{k}": v for k, v in strategy_tensors.items()})
    _atomic_save(tensors, run_dir / CKPT)
    tmp = run_dir / (CKPT_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, run_dir / CKPT_STATE)


def load_checkpoint(run_dir: Path) -> tuple[dict, dict, dict]:
    path, spath = run_dir / CKPT, run_dir / CKPT_STATE
    if not path.exists() or not spath.exists():
        raise UserError("no checkpoint to resume from (checkpoint.safetensors + checkpoint.json)", str(run_dir))
    try:
        tensors = load_file(str(path))
        state = json.loads(spath.read_text())
    except Exception as exc:  # corrupt file of any kind
        raise UserError(f"cannot read checkpoint: {exc}", str(path)) from None
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    strat = {k[9:]: v for k, v in tensors.items() if k.startswith("strategy.")}
    return model, strat, state


def save_model(path: Path, model_state: dict, metadata: dict) -> None:
    _atomic_save(dict(model_state), path, {k: str(v) for k, v in metadata.items()})

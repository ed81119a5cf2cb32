"""Safe reading of model weight files: never executes code from a file, checks the content
hash (`fedmef_toolkit.storage`) and never allocates more than the file can hold."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError, brief
from ..storage import read_safetensors_verified


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (content hash checked when the file has
    one), or a one-line UserError."""
    tensors, meta, _ = read_safetensors_verified(Path(path))
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as exc:
        raise UserError(f"not a valid safetensors file ({brief(exc, 200)})", str(path)) from None


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(dense state dict, validated architecture description or None) of a model file
    (`fedmef_toolkit.architecture.read_model_file`)."""
    from ..architecture import read_model_file as read

    tensors, desc, _ = read(path)
    return tensors, desc


def build_model_for(desc: dict, state: dict[str, torch.Tensor], source: str):
    """`fedmef_toolkit.architecture.model_from_state`."""
    from ..architecture import model_from_state

    return model_from_state(desc, state, source)

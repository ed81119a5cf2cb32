"""Safe reading of model weight files: never executes code from a file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError, brief


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a one-line UserError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", str(path))
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise UserError(f"not a valid safetensors file ({brief(exc, 200)})", str(path)) from None
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
    """(dense state dict, architecture description or None) of a model file we can read."""
    from ..architecture import parse_description

    tensors, meta = read_safetensors(path)
    desc = parse_description(meta["fedmef_arch"], str(path)) if "fedmef_arch" in meta else None
    if meta.get("format") == "fedmef-sparse":
        from .sparse_format import densify

        tensors = densify(tensors, meta, str(path))
    return tensors, desc

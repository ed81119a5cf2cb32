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
    """(dense state dict, validated architecture description or None) of a model file."""
    from ..architecture import parse_description

    tensors, meta = read_safetensors(path)
    desc = parse_description(meta["fedmef_arch"], str(path)) if "fedmef_arch" in meta else None
    if meta.get("format") == "fedmef-sparse":
        from .sparse_format import densify

        tensors = densify(tensors, meta, str(path))
    return tensors, desc


def build_model_for(desc: dict, state: dict[str, torch.Tensor], source: str):
    """The described model with `state` loaded (masks attached), checked against the state's
    shapes on the meta device before anything is allocated."""
    from ..architecture import build_for_state
    from ..sparse.masks import MASK_SUFFIX, attach_masks

    model = build_for_state(desc, {k: tuple(v.shape) for k, v in state.items()}, source)
    masks = {k[: -len("." + MASK_SUFFIX)]: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    try:
        if masks:
            attach_masks(model, masks)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"tensors do not fit the described architecture: {brief(exc)}", source) from None
    return model

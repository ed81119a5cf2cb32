"""Bytes on the wire: what a model or a message costs to send.

A masked tensor is sent as its active values plus either a bitmask or int32
indices, whichever is smaller; a dense tensor as its values.
"""

from __future__ import annotations

import torch

from ..sparse.masks import MASK_SUFFIX


def sparse_tensor_bytes(numel: int, nnz: int, value_bytes: int) -> int:
    return nnz * value_bytes + min(nnz * 4, (numel + 7) // 8)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes to send a model state whose masks (if any) are part of it."""
    total = 0
    for key, t in state.items():
        if key.endswith(MASK_SUFFIX):
            continue  # counted with its weight below
        mask = state.get(key[: -len("weight")] + MASK_SUFFIX) if key.endswith("weight") else None
        if mask is not None:
            total += sparse_tensor_bytes(t.numel(), int(mask.sum()), t.element_size())
        else:
            total += t.numel() * t.element_size()
    return total


def message_bytes(index_value_pairs) -> int:
    """Sparse messages as int32 index + value pairs."""
    return sum(int(i.numel()) * 4 + int(v.numel()) * v.element_size() for i, v in index_value_pairs)


def mask_bytes(mask: torch.Tensor) -> int:
    return (mask.numel() + 7) // 8

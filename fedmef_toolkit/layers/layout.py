"""Tensors as rows in their memory order, for kernels that do not care about the order
within a row: per-sample SAP selection (a sample's entries), weight standardisation and
AGC (an output channel's fan-in).

A 4-d tensor in channels-last memory format (N, C, H, W with strides that put C last) is
viewed as (N, H*W*C) rows without a copy, so a channels-last network keeps its layout
through these layers; a contiguous tensor as (N, C*H*W); anything else is copied to
contiguous first. `from_rows` undoes `rows` for the layout `rows` saw.
"""

from __future__ import annotations

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """4-d, dense in channels-last order and not also plain contiguous (C = 1 or H = W = 1
    tensors are both: they take the contiguous path)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def rows(t: torch.Tensor, count: int) -> torch.Tensor:
    """t as `count` rows in its memory order (a view where t is contiguous or channels-last)."""
    if is_channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(count, -1)
    return t.reshape(count, -1).contiguous()


def from_rows(r: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    """The tensor of `shape` whose `rows(..)` were `r` (channels-last strides if it was)."""
    if channels_last:
        n, c, h, w = shape
        return r.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return r.reshape(shape)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def channels_last_for(setting: bool | None, device: torch.device) -> bool:
    """The recipe's `channels_last` resolved: None means on CUDA, off elsewhere."""
    return torch.device(device).type == "cuda" if setting is None else bool(setting)

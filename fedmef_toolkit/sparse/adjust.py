"""Prune-and-grow on one layer, and the gradient messages clients send for it."""

from __future__ import annotations

import torch


def smallest_active(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k active entries with the smallest |w| (theta_low for the layer)."""
    out = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device)  # contiguous whatever mask's layout
    if k <= 0:
        return out
    scores = weight.detach().abs().float().masked_fill(~mask, float("inf")).flatten()
    # index_fill_ takes True as a kernel argument; `out[idx] = True` copies it from host memory
    # first, a host sync inside a FedDST client's round
    out.view(-1).index_fill_(0, torch.topk(scores, k, largest=False, sorted=False).indices, True)
    return out


def largest_inactive(score: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k candidate entries with the largest |score|."""
    out = torch.zeros(candidates.shape, dtype=candidates.dtype, device=candidates.device)
    if k <= 0:
        return out
    s = score.detach().abs().float().masked_fill(~candidates, -1.0).flatten()
    out.view(-1).index_fill_(0, torch.topk(s, k, sorted=False).indices, True)
    return out


def prune_and_grow(mask: torch.Tensor, prune: torch.Tensor, grow_score: torch.Tensor, count: int | None = None):
    """Drop the `prune` entries, then grow as many among the now-inactive entries
    with the largest |grow_score|. Returns (new mask, grown entries). `count`: how many
    entries `prune` holds, where the caller knows (else counted: a host sync on a GPU;
    on the CPU, where counting costs nothing, a given count is checked)."""
    if count is None or not prune.is_cuda:
        counted = int(prune.sum())
        if count is not None and count != counted:
            raise ValueError(f"prune_and_grow: count {count}, but prune holds {counted} entries")
        count = counted
    kept = mask & ~prune
    grown = largest_inactive(grow_score, ~kept, count)
    return kept | grown, grown


def topk_message(grad: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's sparse upload: flat indices and values of its k largest-|grad| candidates.
    Without a host sync (a client finishing mid-round must not stall the others): where k
    exceeds the candidates, the extra entries are non-candidates sent with value 0, which
    change no sum of messages."""
    flat = grad.detach().float().flatten()
    s = flat.abs().masked_fill(~candidates.flatten(), -1.0)
    idx = torch.topk(s, min(k, s.numel()), sorted=False).indices
    return idx.to(torch.int64), torch.where(candidates.flatten()[idx], flat[idx], 0.0)


def sum_messages(shape, messages: list[tuple[torch.Tensor, torch.Tensor, float]], device=None) -> torch.Tensor:
    """Server side: the weighted sum of sparse messages (indices, values, weight) as a dense tensor."""
    total = torch.zeros(int(torch.Size(shape).numel()), device=device)
    for idx, val, w in messages:
        total.index_add_(0, idx.to(total.device), val.to(total.device) * w)
    return total.view(shape)

"""Closed-form schedules of dynamic pruning and budget-aware extrusion."""

from __future__ import annotations

import math

import torch


def is_adjustment_round(t: int, delta_t: int, t_end: int) -> bool:
    """Mask adjustment happens in rounds t with t mod delta_t == 0 and 0 < t <= t_end."""
    return 0 < t <= t_end and t % delta_t == 0


def adjustment_fraction(t: int, alpha: float, t_end: int) -> float:
    """a_t = alpha/2 * (1 + cos(pi t / T_end)), the cosine-annealed swap fraction."""
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


def swap_count(fraction: float, nnz: int) -> int:
    """k_l = ceil(a_t * nnz_l), never more than the layer's active entries."""
    return min(nnz, math.ceil(fraction * nnz - 1e-9))


def next_adjustment_round(t: int, delta_t: int, t_end: int) -> int | None:
    """The first adjustment round >= t, or None if there is none left."""
    nxt = max(delta_t, math.ceil(t / delta_t) * delta_t)
    return nxt if nxt <= t_end else None


def is_extrusion_round(t: int, delta_t: int, t_end: int, window: int) -> bool:
    """True in the `window` rounds that end with (and include) an adjustment round."""
    nxt = next_adjustment_round(t, delta_t, t_end)
    return nxt is not None and nxt - t < window


def rex_factor(step: int, total: int) -> float:
    """REX profile p(s) = (1 - s/T) / (1/2 + 1/2 (1 - s/T))."""
    z = 1.0 - step / total
    return z / (0.5 + 0.5 * z)


def bae_step_size(step: int, total: int, lr: float, lr0: float, low_norm, psi: float = 1.0,
                  max_lr: float | None = None):
    """mu_s = max(eta_s, beta_s), beta_s = psi * p(s) * (2 sigmoid(||theta_low||) - 1) * eta_0.

    `low_norm` a float gives a float; a (0-dim) tensor gives a tensor on its device, so a
    training step can use the step size without waiting for the norm on the host."""
    factor = psi * rex_factor(step, total) * lr0
    if isinstance(low_norm, torch.Tensor):
        mu = (factor * (2.0 * torch.sigmoid(low_norm.float()) - 1.0)).clamp_min(lr)
        return mu.clamp_max(max_lr) if max_lr is not None else mu
    mu = max(lr, factor * (2.0 / (1.0 + math.exp(-low_norm)) - 1.0))
    return min(mu, max_lr) if max_lr is not None else mu


def round_lr(t: int, rounds: int, lr: float, schedule: str, decay: float) -> float:
    """Learning rate for round t (1-based)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / rounds))
    if schedule == "exp":
        return lr * decay ** (t - 1)
    raise ValueError(f"unknown lr schedule {schedule!r}")

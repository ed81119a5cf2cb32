"""Per-layer densities: Erdos-Renyi-Kernel (RigL) or uniform."""

from __future__ import annotations

import math


def erk_raw(shape: tuple[int, ...]) -> float:
    """sum(dims) / prod(dims): (n_out + n_in + kh + kw) / (n_out n_in kh kw) for a conv,
    (n_out + n_in) / (n_out n_in) for a linear layer."""
    return sum(shape) / math.prod(shape)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Solve eps so that sum_l d_l * size_l = density * total with d_l = eps * raw_l.

    Layers whose density would exceed 1 are made dense and eps is solved again
    over the rest, until no layer exceeds 1.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        budget = density * total - sum(sizes[n] for n in dense)
        divisor = sum(erk_raw(shapes[n]) * sizes[n] for n in sparse)
        if not sparse or divisor == 0:
            return {n: 1.0 for n in shapes}
        eps = budget / divisor
        over = [n for n in sparse if eps * erk_raw(shapes[n]) > 1.0]
        if not over:
            out = {n: 1.0 for n in dense}
            out.update({n: eps * erk_raw(shapes[n]) for n in sparse})
            return out
        dense.update(over)


def uniform_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    return {n: density for n in shapes}


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, distribution: str) -> dict[str, float]:
    if distribution == "erk":
        return erk_densities(shapes, density)
    if distribution == "uniform":
        return uniform_densities(shapes, density)
    raise ValueError(f"unknown density distribution {distribution!r}")

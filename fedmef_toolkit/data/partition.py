"""Splitting training data over clients: IID or per-class Dirichlet(alpha)."""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def iid_partition(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, min_samples: int, seed: int, max_tries: int = 1000
) -> list[np.ndarray]:
    """Per class, split its samples over clients by proportions ~ Dirichlet(alpha).

    Draws are repeated until every client holds at least `min_samples`
    (the usual rejection scheme); deterministic for a seed.
    """
    if num_clients * min_samples > len(labels):
        raise UserError(
            f"data: {num_clients} clients x {min_samples} min_samples exceeds the {len(labels)} training samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min_samples:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise UserError(
        f"data: could not give every one of {num_clients} clients {min_samples} samples with Dirichlet alpha {alpha} "
        f"in {max_tries} draws; lower data.min_samples or raise data.alpha"
    )


def partition(labels: np.ndarray, scheme: str, num_clients: int, alpha: float, min_samples: int, seed: int):
    if scheme == "iid":
        parts = iid_partition(labels, num_clients, seed)
        if min(len(p) for p in parts) < min_samples:
            raise UserError(f"data: {len(labels)} samples give clients fewer than min_samples={min_samples}")
        return parts
    return dirichlet_partition(labels, num_clients, alpha, min_samples, seed)


def class_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]

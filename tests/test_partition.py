import numpy as np
import pytest

from fedmef_toolkit.data.partition import class_histograms, dirichlet_partition, iid_partition
from fedmef_toolkit.errors import UserError

LABELS = np.repeat(np.arange(10), 300)


def check_is_partition(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_sizes_and_cover():
    parts = iid_partition(LABELS, 7, seed=1)
    check_is_partition(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_cover_min_size_determinism():
    a = dirichlet_partition(LABELS, 20, 0.5, 30, seed=3)
    b = dirichlet_partition(LABELS, 20, 0.5, 30, seed=3)
    c = dirichlet_partition(LABELS, 20, 0.5, 30, seed=4)
    check_is_partition(a, len(LABELS))
    assert min(len(p) for p in a) >= 30
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def mean_class_entropy(parts):
    hists = np.array(class_histograms(LABELS, parts, 10), dtype=float)
    p = hists / hists.sum(1, keepdims=True)
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    return ent.mean()


def test_alpha_controls_skew():
    skewed = mean_class_entropy(dirichlet_partition(LABELS, 20, 0.1, 5, seed=0))
    mild = mean_class_entropy(dirichlet_partition(LABELS, 20, 100.0, 5, seed=0))
    assert skewed < 1.2 < mild  # log(10) = 2.30 is a uniform class mix
    assert mild > 2.1


def test_impossible_min_size_is_a_user_error():
    with pytest.raises(UserError, match="min_samples"):
        dirichlet_partition(LABELS, 100, 0.5, 31, seed=0)

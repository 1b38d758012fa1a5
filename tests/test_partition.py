import numpy as np
import pytest

from flcore.partition import balanced_subset, class_groups, dirichlet_split, long_tail_counts, make_split


@pytest.mark.parametrize(
    ("n_max", "classes", "imbalance", "total"),
    [
        (5000, 10, 100, 12406),
        (5000, 10, 50, 13996),
        (5000, 10, 10, 20431),
        (500, 100, 100, 10847),
        (500, 100, 50, 12608),
        (500, 100, 10, 19573),
    ],
)
def test_long_tail_sizes_match_creff(n_max, classes, imbalance, total):
    counts = long_tail_counts(n_max, classes, imbalance)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == int(n_max / imbalance)
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_imbalance_one_is_balanced():
    assert long_tail_counts(100, 5, 1.0) == [100] * 5


def cifar_like_labels(per_class=60, classes=10):
    return np.repeat(np.arange(classes), per_class)


def test_split_pool_follows_profile_and_align_is_balanced_and_disjoint():
    labels = cifar_like_labels()
    split = make_split(labels, 10, 10.0, align_per_class=5, num_clients=4, alpha=0.5, min_size=1, seed=1)
    assert np.bincount(labels[split.align], minlength=10).tolist() == [5] * 10
    assert not set(split.align) & set(split.pool)
    expected = [min(n, 55) for n in long_tail_counts(60, 10, 10.0)]
    assert split.pool_counts(labels).tolist() == expected


def test_dirichlet_split_is_complete_disjoint_and_seeded():
    labels = cifar_like_labels(40)
    a = make_split(labels, 10, 5.0, 4, num_clients=6, alpha=0.5, min_size=2, seed=3)
    b = make_split(labels, 10, 5.0, 4, num_clients=6, alpha=0.5, min_size=2, seed=3)
    c = make_split(labels, 10, 5.0, 4, num_clients=6, alpha=0.5, min_size=2, seed=4)
    joined = np.concatenate(a.clients)
    assert len(joined) == len(set(joined.tolist())) == len(a.pool)
    assert set(joined.tolist()) == set(a.pool.tolist())
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.clients, c.clients, strict=True))
    assert min(len(x) for x in a.clients) >= 2
    assert a.client_histogram(labels).sum() == len(a.pool)


def test_small_alpha_is_more_heterogeneous():
    labels = cifar_like_labels(100)

    def mean_classes_per_client(alpha):
        parts = dirichlet_split(labels, 10, alpha, seed=0, min_size=1)
        return np.mean([len(np.unique(labels[p])) for p in parts])

    assert mean_classes_per_client(0.05) < mean_classes_per_client(100.0)


def test_balanced_subset_takes_per_class():
    labels = cifar_like_labels(7, 3)
    idx = balanced_subset(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [2, 2, 2]


def test_class_groups_use_thresholds():
    groups = class_groups(np.array([500, 101, 100, 20, 19, 3]), many=100, few=20)
    assert groups == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}

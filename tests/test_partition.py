import hashlib
import math

import datasets
import numpy as np
import pytest

from flcore.config import ConfigError
from flcore.creff_split import CReFFPartitioner, partition_positions
from flcore.partition import balanced_subset, class_groups, client_split, long_tail_counts, make_split


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


@pytest.mark.parametrize(
    ("imbalance", "head_cut"), [(100.0, [6] + [0] * 9), (1.0, [6] * 10), (1.2, [6] * 5 + [5, 4, 3, 2, 1])]
)
def test_the_holdout_reserve_is_class_balanced_and_drawn_before_the_long_tailed_cut(imbalance, head_cut):
    """The stand-in teacher's reserve: `holdout` images of every class, the head's too, which the pool's head
    gives up (at a small IF, where every class keeps (nearly) all its images, every class gives some up)."""
    labels = cifar_like_labels()
    plain = make_split(labels, 10, imbalance, 5, num_clients=4, alpha=0.5, min_size=1, seed=1)
    split = make_split(labels, 10, imbalance, 5, num_clients=4, alpha=0.5, min_size=1, seed=1, holdout="auto")
    assert np.bincount(labels[split.holdout], minlength=10).tolist() == [6] * 10  # auto: 60 // 10
    assert not np.intersect1d(split.holdout, np.union1d(split.align, split.pool)).size
    assert np.array_equal(split.align, plain.align)
    assert split.pool_cut.tolist() == head_cut
    assert (plain.pool_counts(labels) - split.pool_counts(labels)).tolist() == head_cut
    assert not len(plain.holdout) and not plain.pool_cut.any() and plain.reserve(labels) == {}


def test_a_holdout_reserve_that_would_empty_a_class_is_refused():
    labels = cifar_like_labels()
    with pytest.raises(ConfigError, match=r"'holdout-per-class' = 55 is not allowed.*class 0 has 55.*from 1 to 54"):
        make_split(labels, 10, 10.0, 5, num_clients=4, alpha=0.5, min_size=1, seed=1, holdout=55)
    split = make_split(labels, 10, 10.0, 5, num_clients=4, alpha=0.5, min_size=1, seed=1, holdout=54)
    assert split.pool_counts(labels).tolist() == [1] * 10


@pytest.mark.parametrize("partitioner", ["creff", "dirichlet"])
def test_client_split_is_complete_disjoint_and_seeded(partitioner):
    labels = cifar_like_labels(40)
    a = make_split(labels, 10, 5.0, 4, num_clients=6, alpha=0.5, min_size=2, seed=3, partitioner=partitioner)
    b = make_split(labels, 10, 5.0, 4, num_clients=6, alpha=0.5, min_size=2, seed=3, partitioner=partitioner)
    c = make_split(labels, 10, 5.0, 4, num_clients=6, alpha=0.5, min_size=2, seed=4, partitioner=partitioner)
    joined = np.concatenate(a.clients)
    assert len(joined) == len(set(joined.tolist())) == len(a.pool)
    assert set(joined.tolist()) == set(a.pool.tolist())
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.clients, c.clients, strict=True))
    assert min(len(x) for x in a.clients) >= 2
    assert a.client_histogram(labels).sum() == len(a.pool)


@pytest.mark.parametrize("partitioner", ["creff", "dirichlet"])
def test_small_alpha_is_more_heterogeneous(partitioner):
    labels = cifar_like_labels(100)

    def mean_classes_per_client(alpha):
        parts = client_split(labels, partitioner, 10, alpha, seed=0, min_size=1, num_classes=10)
        return np.mean([len(np.unique(labels[p])) for p in parts])

    assert mean_classes_per_client(0.05) < mean_classes_per_client(100.0)


def test_balanced_subset_takes_per_class():
    labels = cifar_like_labels(7, 3)
    idx = balanced_subset(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [2, 2, 2]


def test_class_groups_use_thresholds():
    groups = class_groups(np.array([500, 101, 100, 20, 19, 3]), many=100, few=20)
    assert groups == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def reference_creff_split(label2indices, num_clients, alpha, seed, group=10):
    """CReFF's clients_indices (Dataset/sample_dirichlet.py), re-written independently from its description:
    lists of (index, label) tuples, one Dirichlet draw per class and group, re-cut into equal parts."""
    pairs = [(idx, label) for label, indices in enumerate(label2indices) for idx in indices]
    rs = np.random.RandomState(seed)
    rs.shuffle(pairs)
    n_groups = math.ceil(num_clients / group)
    chunks, start = [], 0
    for g in range(n_groups):
        stop = start + int(group / num_clients * len(pairs))
        chunks.append(pairs[start : len(pairs) if g == n_groups - 1 else stop])
        start = stop
    joined, left = [], num_clients
    for chunk in chunks:
        targets, n = np.array(chunk), min(group, left)
        left -= group
        lists, smallest = None, 0
        while smallest < int(0.50 * len(targets) / n):
            lists = [[] for _ in range(n)]
            for label in range(len(label2indices)):
                members = targets[np.where(targets[:, 1] == label)[0], 0]
                p = rs.dirichlet(np.repeat(alpha, n))
                p = np.array([q * (len(lst) < len(targets) / n) for q, lst in zip(p, lists, strict=True)])
                p = p / p.sum()
                cuts = (np.cumsum(p) * len(members)).astype(int)[:-1]
                lists = [lst + piece.tolist() for lst, piece in zip(lists, np.split(members, cuts), strict=True)]
                smallest = min(len(lst) for lst in lists)
        joined += [x for lst in lists for x in lst]
    size, extra = divmod(len(joined), num_clients)
    parts, i = [], 0
    for k in range(num_clients):
        step = size + (k < extra)
        parts.append(joined[i : i + step])
        i += step
    return parts


def lt_labels(n_max, classes, imbalance):
    """Sorted labels of a long-tailed set with the exponential profile (CIFAR-10-LT: n_max 5000, IF 100)."""
    return np.repeat(np.arange(classes), long_tail_counts(n_max, classes, imbalance))


@pytest.mark.parametrize(
    ("labels", "clients", "alpha", "seed"),
    [
        (lt_labels(500, 10, 100.0), 20, 0.5, 7),
        (lt_labels(300, 10, 10.0), 25, 0.1, 3),  # three groups, the last of 5 clients
        (lt_labels(80, 5, 1.0), 12, 1.0, 0),  # a ragged last group of 2
    ],
)
def test_creff_partitioner_matches_the_reference_algorithm(labels, clients, alpha, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(labels)  # positions of a class are not contiguous
    classes = int(labels.max()) + 1
    expected = reference_creff_split(
        [np.flatnonzero(labels == c).tolist() for c in range(classes)], clients, alpha, seed
    )
    part = CReFFPartitioner(clients, "label", alpha, seed, num_classes=classes)
    part.dataset = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    got = part.partition_positions()
    assert [p.tolist() for p in got] == expected
    assert part.load_partition(3)["row"] == expected[3]
    sizes = [len(p) for p in got]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    joined = np.concatenate(got)
    assert sorted(joined.tolist()) == list(range(len(labels)))


def test_creff_gives_cifar10_lt_clients_619_to_620_images():
    """CIFAR-10-LT IF 100, 20 clients, seed 7: 12,406 long-tail images, 10 of them (class 0's) in D_align."""
    assert sum(long_tail_counts(5000, 10, 100.0)) == 12406
    labels = cifar_like_labels(5000)
    creff = make_split(labels, 10, 100.0, 10, 20, 0.5, 2, 7)
    assert len(creff.pool) == 12396
    assert sorted({len(c) for c in creff.clients}) == [619, 620]
    joined = np.concatenate(creff.clients)
    assert len(joined) == len(set(joined.tolist())) and set(joined.tolist()) == set(creff.pool.tolist())
    classes_held = (creff.client_histogram(labels) > 0).sum(axis=1)
    assert classes_held.min() == 1 and classes_held.max() == 10 and (classes_held <= 4).sum() == 11
    plain = make_split(labels, 10, 100.0, 10, 20, 0.5, 2, 7, partitioner="dirichlet")
    assert min(len(c) for c in plain.clients) == 80 and max(len(c) for c in plain.clients) == 1248
    whole_pool = client_split(lt_labels(5000, 10, 100.0), "creff", 20, 0.5, 7, 2, 10)
    assert sorted({len(c) for c in whole_pool}) == [620, 621]


def test_dirichlet_partitioner_reproduces_the_earlier_split():
    """partitioner=dirichlet keeps the split the project drew before CReFF's became the default."""
    split = make_split(cifar_like_labels(), 10, 10.0, 5, 6, 0.5, 2, 3, partitioner="dirichlet")
    digest = hashlib.sha256(b"".join(c.astype(np.int64).tobytes() + b"|" for c in split.clients)).hexdigest()
    assert [len(c) for c in split.clients] == [35, 53, 29, 30, 21, 67]
    assert digest[:16] == "ca18cf9c6fe79f9a"


def test_creff_refuses_a_pool_too_small_for_min_partition_size():
    labels = cifar_like_labels(3)
    with pytest.raises(ConfigError, match=r"'min-partition-size' = 4 .*'creff' gives the smallest of 10 clients 3"):
        client_split(labels, "creff", 10, 0.5, 0, 4, 10)
    assert [len(p) for p in client_split(labels, "creff", 10, 0.5, 0, 3, 10)] == [3] * 10


def test_creff_partitioner_plugs_into_federated_dataset(tmp_path):
    from flwr_datasets import FederatedDataset

    labels = lt_labels(60, 4, 10.0)
    csv = tmp_path / "data.csv"
    csv.write_text("label,row\n" + "".join(f"{y},{i}\n" for i, y in enumerate(labels)))
    fds = FederatedDataset(
        dataset="csv",
        data_files={"train": str(csv)},
        cache_dir=str(tmp_path / "cache"),
        partitioners={"train": CReFFPartitioner(5, "label", 0.5, seed=1)},
    )
    rows = [fds.load_partition(i)["row"] for i in range(5)]
    assert sorted(len(r) for r in rows) == [len(labels) // 5] * 5
    assert sorted(x for r in rows for x in r) == list(range(len(labels)))


def test_creff_split_of_1000_clients_reads_its_draw_without_a_select_per_client(monkeypatch):
    """`datasets.select` costs ~3 ms a call: once per client it made drawing a 1,000-client split take seconds
    in every process; CReFF's positions come from its draw, equal to what loading each partition gives."""
    labels = lt_labels(600, 10, 1.0)
    part = CReFFPartitioner(1000, "label", 1.0, 7, num_classes=10)
    part.dataset = datasets.Dataset.from_dict({"label": labels.tolist(), "pos": list(range(100, 100 + len(labels)))})
    loaded = [np.asarray(part.load_partition(i)["pos"]) for i in (0, 999)]

    def no_select(*args, **kwargs):
        raise AssertionError("a partition was loaded through datasets.select")

    monkeypatch.setattr(datasets.Dataset, "select", no_select)
    got = partition_positions(part)
    assert len(got) == 1000 and [got[0].tolist(), got[999].tolist()] == [p.tolist() for p in loaded]
    assert sum(len(p) for p in client_split(labels, "creff", 1000, 1.0, 7, 2, 10)) == len(labels)

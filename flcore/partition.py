"""The paper's data recipe: D_align, a long-tailed pool (Cui et al.), a Dirichlet split over clients.

Everything is a pure function of the labels and the seed, so the server and every client derive the
same split independently and no index lists travel over the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class sizes of the exponential profile: class c keeps int(n_max * IF^(-c/(C-1)))."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * imbalance_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random indices of every class (all of a class's indices when it has fewer)."""
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def long_tail_pool(
    labels: np.ndarray, available: np.ndarray, num_classes: int, imbalance_factor: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the long-tailed pool drawn from `available`.

    n_max is the balanced per-class size of the whole training split (len(labels) / C), as in Cui et al.
    and CReFF; a class with fewer available images keeps all of them. IF = 1 keeps every available
    image, so an already long-tailed source (ImageNet-LT) passes through unchanged.
    """
    if imbalance_factor == 1:
        return np.sort(available)
    wanted = long_tail_counts(len(labels) // num_classes, num_classes, imbalance_factor)
    avail_labels = labels[available]
    picked = [rng.permutation(available[avail_labels == c])[:n] for c, n in enumerate(wanted)]
    return np.sort(np.concatenate(picked))


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int) -> list[np.ndarray]:
    """Positions into `labels` for each client, drawn with flwr-datasets' DirichletPartitioner."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    table = datasets.Dataset.from_dict({"label": labels.tolist(), "pos": list(range(len(labels)))})
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = table
    return [np.sort(np.asarray(partitioner.load_partition(i)["pos"], dtype=np.int64)) for i in range(num_clients)]


@dataclass(frozen=True)
class Split:
    """Indices into the training split: D_align, the long-tailed pool and each client's share of it."""

    align: np.ndarray
    pool: np.ndarray
    clients: list[np.ndarray]
    num_classes: int

    def pool_counts(self, labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels[self.pool], minlength=self.num_classes)

    def client_histogram(self, labels: np.ndarray) -> np.ndarray:
        """clients x classes image counts."""
        return np.stack([np.bincount(labels[idx], minlength=self.num_classes) for idx in self.clients])


def make_split(
    labels: np.ndarray,
    num_classes: int,
    imbalance_factor: float,
    align_per_class: int,
    num_clients: int,
    alpha: float,
    min_size: int,
    seed: int,
) -> Split:
    """D_align first (class-balanced), then the long-tailed pool from what is left, then the client split."""
    rng = np.random.default_rng(seed)
    align = balanced_subset(labels, align_per_class, rng)
    rest = np.setdiff1d(np.arange(len(labels)), align)
    pool = long_tail_pool(labels, rest, num_classes, imbalance_factor, rng)
    parts = dirichlet_split(labels[pool], num_clients, alpha, seed, min_size)
    return Split(align, pool, [pool[p] for p in parts], num_classes)


def class_groups(counts: np.ndarray, many: int, few: int) -> dict[str, list[int]]:
    """ImageNet-LT convention: many (> many), medium (few..many), few (< few) training images."""
    return {
        "many": [c for c, n in enumerate(counts) if n > many],
        "medium": [c for c, n in enumerate(counts) if few <= n <= many],
        "few": [c for c, n in enumerate(counts) if n < few],
    }

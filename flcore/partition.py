"""The paper's data recipe: D_align, a long-tailed pool (Cui et al.), a split over clients.

Everything is a pure function of the labels and the seed, so the server and every client derive the
same split independently and no index lists travel over the network. Clients are split by a
flwr-datasets `Partitioner` chosen by name (`flcore.partitioners.PARTITIONERS`): CReFF's re-balanced
Dirichlet split (the paper's protocol, `creff_split` here) or flwr-datasets' own `DirichletPartitioner`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flcore.config import ConfigError

CREFF_GROUP = 10  # CReFF draws its Dirichlet split for groups of 10 clients at a time
CREFF_MAX_DRAWS = 1000


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


def _dirichlet_group(
    chunk: np.ndarray, n_clients: int, num_classes: int, alpha: float, rs: np.random.RandomState
) -> list[np.ndarray]:
    """One group of CReFF's split: (position, label) rows dealt to `n_clients` clients, class by class.

    Each class is cut by a Dirichlet(alpha) draw whose shares of clients already holding their even
    share of the chunk are zeroed ("balance"); the whole draw is repeated until the smallest client holds
    at least half the even share. It is drawn at least once, also for chunks of fewer than two rows per
    client (the reference skips those, losing their rows).
    """
    even = len(chunk) / n_clients
    needed = int(0.5 * len(chunk) / n_clients)
    by_class = [chunk[chunk[:, 1] == c, 0] for c in range(num_classes)]
    for _ in range(CREFF_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for members in by_class:
            shares = rs.dirichlet(np.repeat(alpha, n_clients)) * (sizes < even)
            total = shares.sum()
            if total == 0:  # every client is full only once all rows are dealt: `members` is empty
                continue
            cuts = (np.cumsum(shares / total) * len(members)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(members, cuts)):
                parts[j].append(piece)
                sizes[j] += len(piece)
        if sizes.min() >= needed:
            return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]
    raise ValueError(
        f"CReFF's split found no draw in {CREFF_MAX_DRAWS} that gives each of {n_clients} clients at least "
        f"{needed} of {len(chunk)} images; raise dirichlet-alpha or lower num-clients."
    )


def creff_split(labels: np.ndarray, num_clients: int, alpha: float, seed: int, num_classes: int) -> list[np.ndarray]:
    """Positions into `labels` per client, by CReFF's `clients_indices` (Dataset/sample_dirichlet.py).

    A `RandomState(seed)` shuffles the class-major (position, label) list and cuts it into one chunk per
    group of 10 clients (the last group takes the remainder); each chunk is dealt by `_dirichlet_group`;
    the clients' lists are joined in order and cut into `num_clients` consecutive parts of equal size (the
    first `len % num_clients` one larger). So every client holds pool / num_clients images, while the
    class mix stays Dirichlet-skewed. Fewer than 10 clients form one group (the reference asserts >= 10).
    """
    rs = np.random.RandomState(seed)
    order = np.argsort(labels, kind="stable")
    rows = np.stack([order, labels[order]], axis=1).astype(np.int64)
    rs.shuffle(rows)
    groups = math.ceil(num_clients / CREFF_GROUP)
    step = int(CREFF_GROUP / num_clients * len(rows))
    joined = []
    for g in range(groups):
        last = g == groups - 1
        chunk = rows[g * step : len(rows) if last else (g + 1) * step]
        n = num_clients - CREFF_GROUP * g if last else CREFF_GROUP
        joined.extend(_dirichlet_group(chunk, n, num_classes, alpha, rs))
    return equal_parts(np.concatenate(joined), num_clients)


def equal_parts(positions: np.ndarray, num_parts: int) -> list[np.ndarray]:
    """Consecutive parts of sizes differing by at most one, the larger ones first (CReFF's partition_balance)."""
    size, extra = divmod(len(positions), num_parts)
    ends = np.cumsum([size + (i < extra) for i in range(num_parts)])
    return np.split(positions, ends[:-1])


def client_split(
    labels: np.ndarray, partitioner: str, num_clients: int, alpha: float, seed: int, min_size: int, num_classes: int
) -> list[np.ndarray]:
    """Sorted positions into `labels` for each client, from the named partitioner.

    `min_size` is the smallest partition allowed: DirichletPartitioner redraws below it (and gives up after
    10 draws); CReFF's sizes are fixed at len(labels) / num_clients, so a pool too small for it is refused.
    """
    import datasets

    from flcore.partitioners import PARTITIONERS, partition_positions

    table = datasets.Dataset.from_dict({"label": labels.tolist(), "pos": list(range(len(labels)))})
    chosen = PARTITIONERS[partitioner](num_clients, alpha, seed, min_size, num_classes)
    chosen.dataset = table
    try:
        parts = [np.sort(p) for p in partition_positions(chosen)]
    except ValueError as err:
        raise ConfigError(f"partitioner '{partitioner}' cannot split {len(labels)} images: {err}") from err
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise ConfigError(
            f"run-config key 'min-partition-size' = {min_size} is not allowed: partitioner '{partitioner}' gives "
            f"the smallest of {num_clients} clients {smallest} of {len(labels)} pool images; lower it or num-clients."
        )
    return parts


@dataclass(frozen=True)
class Split:
    """D_align's indices into its source (the training split, unless align-data says otherwise), the
    long-tailed pool's and each client's indices into the training split."""

    align: np.ndarray
    pool: np.ndarray
    clients: list[np.ndarray]
    num_classes: int
    align_from_train: bool = True

    def pool_counts(self, labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels[self.pool], minlength=self.num_classes)

    def client_histogram(self, labels: np.ndarray) -> np.ndarray:
        """clients x classes image counts (no rows when the clients hold their own data)."""
        rows = [np.bincount(labels[idx], minlength=self.num_classes) for idx in self.clients]
        return np.stack(rows) if rows else np.zeros((0, self.num_classes), dtype=np.int64)


def make_split(
    labels: np.ndarray,
    num_classes: int,
    imbalance_factor: float,
    align_per_class: int,
    num_clients: int,
    alpha: float,
    min_size: int,
    seed: int,
    *,
    partitioner: str = "creff",
    align_labels: np.ndarray | None = None,
) -> Split:
    """D_align first (class-balanced), then the long-tailed pool from what is left, then the client split.

    With `align_labels` (a separate D_align source: ImageNet-LT's val split, a server folder) D_align is
    drawn from those and the whole training split stays available to the pool.
    """
    rng = np.random.default_rng(seed)
    own = align_labels is None
    align = balanced_subset(labels if own else align_labels, align_per_class, rng)
    rest = np.setdiff1d(np.arange(len(labels)), align) if own else np.arange(len(labels))
    pool = long_tail_pool(labels, rest, num_classes, imbalance_factor, rng)
    if len(pool) < num_clients * max(1, min_size):  # say so before drawing: a huge num-clients would take minutes
        raise ConfigError(
            f"run-config key 'num-clients' = {num_clients} is not allowed: the long-tailed pool holds {len(pool)} "
            f"images, fewer than num-clients x min-partition-size ({max(1, min_size)})."
        )
    parts = client_split(labels[pool], partitioner, num_clients, alpha, seed, min_size, num_classes)
    return Split(align, pool, [pool[p] for p in parts], num_classes, align_from_train=own)


def class_groups(counts: np.ndarray, many: int, few: int) -> dict[str, list[int]]:
    """ImageNet-LT convention: many (> many), medium (few..many), few (< few) training images."""
    return {
        "many": [c for c, n in enumerate(counts) if n > many],
        "medium": [c for c, n in enumerate(counts) if few <= n <= many],
        "few": [c for c, n in enumerate(counts) if n < few],
    }

"""CReFF's client split (`creff_split`) as a flwr-datasets partitioner (`CReFFPartitioner`), and every
partitioner's partitions as row positions (`partition_positions`).

Imported only when a split is drawn, so that importing the client app stays free of `datasets`; the registry
of partitioners by name is `flcore.partitioners`, light enough for the schema to read its names.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
from flwr_datasets.partitioner import Partitioner

from flcore.progress import progress

CREFF_GROUP = 10  # CReFF draws its Dirichlet split for groups of 10 clients at a time
CREFF_MAX_DRAWS = 1000


def column(table: datasets.Dataset, name: str) -> np.ndarray:
    """One integer column as an array, read in one go (iterating a `datasets` column goes row by row)."""
    return np.asarray(table.with_format("arrow")[:].column(name).to_numpy(), dtype=np.int64)


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
    for g in progress(range(groups), desc="client split", unit="group"):
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


class CReFFPartitioner(Partitioner):
    """CReFF's Dirichlet split as a flwr-datasets partitioner (usable with `FederatedDataset` too).

    Partitions are computed once, on first use, from the `partition_by` column of the assigned dataset;
    class ids are 0..num_classes-1 (default: the largest label + 1). Passing the dataset's class count
    matters when a class has no rows: CReFF still draws its Dirichlet shares, which moves the random stream.
    """

    def __init__(
        self, num_partitions: int, partition_by: str, alpha: float, seed: int, num_classes: int | None = None
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
        self._num_partitions, self._partition_by = num_partitions, partition_by
        self._alpha, self._seed, self._num_classes = alpha, seed, num_classes
        self._parts: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def partition_positions(self) -> list[np.ndarray]:
        """Each partition's row positions, in CReFF's order."""
        if self._parts is None:
            labels = column(self.dataset, self._partition_by)
            classes = self._num_classes if self._num_classes is not None else int(labels.max(initial=-1)) + 1
            self._parts = creff_split(labels, self._num_partitions, self._alpha, self._seed, classes)
        return self._parts

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self.dataset.select(self.partition_positions()[partition_id].tolist())


def partition_positions(partitioner: Partitioner) -> list[np.ndarray]:
    """Each partition's values of the assigned dataset's `pos` column (its row positions): CReFF's straight from
    its draw, any other partitioner's by loading every partition (a `datasets.select` per partition, about
    3 ms each: seconds for a thousand clients, in every process that draws the split)."""
    if isinstance(partitioner, CReFFPartitioner):
        pos = column(partitioner.dataset, "pos")
        return [pos[p] for p in partitioner.partition_positions()]
    parts = progress(range(partitioner.num_partitions), desc="client split", unit="client")
    return [column(partitioner.load_partition(i), "pos") for i in parts]

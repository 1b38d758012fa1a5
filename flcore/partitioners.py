"""flwr-datasets partitioners for the client split, by the name the `partitioner` run-config key gives.

Imported only when a split is drawn, so that importing the client app stays free of `datasets`.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, Partitioner

from flcore.partition import creff_split


def column(table: datasets.Dataset, name: str) -> np.ndarray:
    """One integer column as an array, read in one go (iterating a `datasets` column goes row by row)."""
    return np.asarray(table.with_format("arrow")[:].column(name).to_numpy(), dtype=np.int64)


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
    return [column(partitioner.load_partition(i), "pos") for i in range(partitioner.num_partitions)]


def _creff(num_clients: int, alpha: float, seed: int, min_size: int, num_classes: int) -> Partitioner:
    return CReFFPartitioner(num_clients, "label", alpha, seed, num_classes)


def _dirichlet(num_clients: int, alpha: float, seed: int, min_size: int, num_classes: int) -> Partitioner:
    return DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


# name -> factory(num_clients, alpha, seed, min_size, num_classes); the `partitioner` run-config key picks one.
PARTITIONERS: dict[str, Callable[[int, float, int, int, int], Partitioner]] = {
    "creff": _creff,
    "dirichlet": _dirichlet,
}

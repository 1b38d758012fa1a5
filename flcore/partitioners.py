"""flwr-datasets partitioners for the client split, by the name the `partitioner` run-config key gives.

The one list of partitioner names: the schema (`flcore.config`) reads this registry's keys to check the key.
So this module imports neither `datasets` nor flwr-datasets (which imports it): a node holding its own data
validates its config without them, and each factory imports its partitioner when a split is drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


def _creff(num_clients: int, alpha: float, seed: int, min_size: int, num_classes: int) -> Partitioner:
    from flcore.creff_split import CReFFPartitioner

    return CReFFPartitioner(num_clients, "label", alpha, seed, num_classes)


def _dirichlet(num_clients: int, alpha: float, seed: int, min_size: int, num_classes: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

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

"""Which images this node trains on, read per request: its partition of the run's pool, or its own folder.

- `client-data=partition` (the simulation, or SuperNodes sharing one copy of the dataset): the node config's
  `partition-id` picks one client of the split that every party draws alike from the run config
  (`flcore.run_data`).
- `client-data=local` (a real federation): the node config's `data-dir` is this node's own data
  (`flcore.local_data`), labelled with the class names the server sends in every request; the folder is
  read anew on each request, so a folder that changed between rounds is used as it is now.

A node whose node config does not fit the run's `client-data` is refused before it trains, with an error
that names the setting to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log

from flcore.batches import Batches
from flcore.config import Settings
from flcore.datasets import INPUT_STATS, Dataset, ImageSet
from flcore.device import compute_of
from flcore.local_data import CLASSES_KEY, LocalDataError, class_counts, read_counted
from flcore.run_data import PARTITION_KEY, client_batches, prepare

DATA_DIR_KEY = "data-dir"  # node config: this node's own images
NAME_KEY = "node-name"  # node config: a stable name, for node order and the run summary


@dataclass(frozen=True)
class Shard:
    """This node's training data for one request, the class names, and the number that seeds its draws."""

    batches: Batches
    classes: tuple[str, ...]
    stream: int  # the partition id, or (own data) the node id the SuperLink gave this node
    local: bool
    skipped: int = 0  # (own data) image files left out because they cannot be used

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> list[int]:
        return class_counts(self.batches.data, self.num_classes)


def shard(cfg: Settings, context: Context, server_config: Mapping) -> Shard:
    """This node's data for a request whose config is `server_config` (see the module docstring)."""
    if cfg.local_data:
        return _own_data(cfg, context, server_config)
    return _partition(cfg, context.node_config, server_config)


def _partition(cfg: Settings, node_config: Mapping, server_config: Mapping) -> Shard:
    if DATA_DIR_KEY in node_config:
        raise LocalDataError(
            f"this node has its own data (node config data-dir = '{node_config[DATA_DIR_KEY]}'), but the run has "
            "client-data = partition, under which every node trains on its partition of the server's dataset; "
            "start the run with client-data = local, or this node without data-dir."
        )
    partition_id = served_partition(cfg, node_config, server_config)
    num_partitions = int(node_config.get("num-partitions", cfg.num_clients))
    if num_partitions != cfg.num_clients:
        raise ValueError(
            f"this node has num-partitions={num_partitions} but run-config num-clients="
            f"{cfg.num_clients}: start the federation with num-supernodes = num-clients."
        )
    classes = prepare(cfg).dataset.classes
    return Shard(client_batches(cfg, partition_id), classes, partition_id, local=False)


def served_partition(cfg: Settings, node_config: Mapping, server_config: Mapping) -> int:
    """The partition a request is for: the one the server names (`partition-assignment=server`), else this
    node's own (its node config). With `partition-assignment=node` a node serves its own partition only, so
    another one named is refused."""
    named = server_config.get(PARTITION_KEY)
    own = node_config.get(PARTITION_KEY)
    if named is None:
        if own is None:
            raise LocalDataError(
                "this node's node config has neither partition-id (client-data = partition, the run's setting) "
                'nor data-dir: start it with --node-config "partition-id=<i> num-partitions=<num-clients>".'
            )
        return int(own)
    if not isinstance(named, int) or isinstance(named, bool):
        raise ValueError(f"the server's message names partition {named!r}; expected an integer.")
    if cfg.partition_assignment == "node" and named != own:
        raise ValueError(
            f"the server's message is for partition {named}, but this node serves partition {own} (its node config) "
            "and the run has partition-assignment=node."
        )
    return named


def _own_data(cfg: Settings, context: Context, server_config: Mapping) -> Shard:
    root = context.node_config.get(DATA_DIR_KEY)
    if not root:
        raise LocalDataError(
            "the run has client-data = local, so every node trains on its own images, and this node has none: "
            "start it with --node-config \"data-dir='/path/to/images'\"."
        )
    classes = server_config.get(CLASSES_KEY)
    if not classes:
        raise LocalDataError(f"the server's request carries no class list ('{CLASSES_KEY}') to label this node's data.")
    classes = tuple(str(c) for c in classes)
    images, skipped = read_counted(Path(str(root)), classes, cfg.image_size)
    dataset = Dataset(images, ImageSet.empty(), classes, *INPUT_STATS[cfg.dataset])
    batches = Batches(images, dataset, cfg.image_size, cfg.batch_size, compute_of(cfg))
    found = Shard(batches, classes, int(context.node_id), local=True, skipped=skipped)
    counts = found.class_counts()
    log(
        INFO,
        "local data %s: %d images of %d of the server's %d classes %s; %d image files left out (unusable)",
        root,
        len(images),
        sum(c > 0 for c in counts),
        len(classes),
        {classes[c]: n for c, n in enumerate(counts) if n},
        skipped,
    )
    return found

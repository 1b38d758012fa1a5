"""What a run's configuration determines on each side: the dataset, its split, and each client's batches.

With `client-data=partition` the server and each client call these with the same config and get the same
split; results are cached per process, so a simulated client (a Ray actor serving many partitions) decodes
the dataset once and never reloads data between rounds. With `client-data=local` the clients hold their own
images (`flcore.local_data`): the server reads only its test split and D_align, and there is no split.
Batches are made on the process's device (`flcore.device.compute_of`): a client's partition moves there
once, when its batches are first made. What the server holds is `flcore.server_data`; the run's model,
`flcore.run_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flcore import datasets
from flcore.batches import Batches
from flcore.config import LOCAL, align_source, data_key
from flcore.datasets import Dataset, ImageSet
from flcore.device import Compute, compute_of
from flcore.partition import Split, balanced_subset, holdout_reserve, make_split


@dataclass(frozen=True)
class Prepared:
    """The dataset, its split, and the set D_align's indices point into (the training split unless
    `align-data` names another source)."""

    dataset: Dataset
    split: Split
    align_source: ImageSet


def _server_only(cfg: Mapping) -> Prepared:
    """client-data=local: the server's test split and D_align, nothing of the clients' (no pool, no split).

    D_align comes from `align-data`; carved from the server's own training split (`train`) it is a
    class-balanced draw of align-per-class images per class, as in the partitioned recipe but without a
    long tail, since no pool is cut from what is left. The holdout teacher's reserve is drawn after it from
    the same split, class-balanced too.
    """
    source_name = align_source(cfg)
    dataset = datasets.load(cfg["dataset"], cfg["data-dir"], cfg["image-size"], with_train=source_name == "train")
    source = datasets.align_images(source_name, cfg["data-dir"], dataset.classes)
    labels = dataset.train.labels if source is None else source.labels
    rng = np.random.default_rng(cfg["seed"])
    align = balanced_subset(labels, cfg["align-per-class"], rng)
    empty = np.zeros(0, dtype=np.int64)
    held = empty
    if cfg["holdout-per-class"] and source is None:
        rest = np.setdiff1d(np.arange(len(labels)), align)
        held = holdout_reserve(labels, rest, cfg["holdout-per-class"], dataset.num_classes, rng)
    split = Split(align, empty, [], dataset.num_classes, source is None, held)
    return Prepared(dataset, split, dataset.train if source is None else source)


@lru_cache(maxsize=2)
def _prepare(key: tuple) -> Prepared:
    cfg = dict(key)
    if cfg["client-data"] == LOCAL:
        return _server_only(cfg)
    dataset = datasets.load(cfg["dataset"], cfg["data-dir"], cfg["image-size"])
    source = datasets.align_images(align_source(cfg), cfg["data-dir"], dataset.classes)
    split = make_split(
        dataset.train.labels,
        dataset.num_classes,
        cfg["imbalance-factor"],
        cfg["align-per-class"],
        cfg["num-clients"],
        cfg["dirichlet-alpha"],
        cfg["min-partition-size"],
        cfg["seed"],
        partitioner=cfg["partitioner"],
        align_labels=None if source is None else source.labels,
        holdout=cfg["holdout-per-class"],
    )
    return Prepared(dataset, split, dataset.train if source is None else source)


def prepare(cfg: Mapping) -> Prepared:
    """Dataset and split for a validated config (cached on the settings that determine them)."""
    return _prepare(data_key(cfg))


PARTITION_KEY = "partition-id"  # Flower's node-config key; a server message names the partition it is for by it


@lru_cache(maxsize=64)
def _client_batches(key: tuple, batch_size: int, partition_id: int, compute: Compute) -> Batches:
    prep = _prepare(key)
    cfg = dict(key)
    part = prep.dataset.train.subset(prep.split.clients[partition_id])
    return Batches(part, prep.dataset, cfg["image-size"], batch_size, compute)


def client_batches(cfg: Mapping, partition_id: int) -> Batches:
    """One client's share of the long-tailed pool, ready for local training on this process's device."""
    if not 0 <= partition_id < cfg["num-clients"]:
        raise ValueError(f"partition-id {partition_id} is outside 0..{cfg['num-clients'] - 1} (num-clients).")
    return _client_batches(data_key(cfg), int(cfg["batch-size"]), partition_id, compute_of(cfg))


def batches(cfg: Mapping, images: ImageSet, batch_size: int) -> Batches:
    """Any image set of the run's dataset in batches on this process's device (server sets, teachers)."""
    return Batches(images, prepare(cfg).dataset, int(cfg["image-size"]), batch_size, compute_of(cfg))

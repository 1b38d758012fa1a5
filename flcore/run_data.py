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
from flcore.config import LOCAL, Settings
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


def _server_only(data: Mapping, source_name: str) -> Prepared:
    """client-data=local: the server's test split and D_align, nothing of the clients' (no pool, no split).

    D_align comes from `align-data`; carved from the server's own training split (`train`) it is a
    class-balanced draw of align-per-class images per class, as in the partitioned recipe but without a
    long tail, since no pool is cut from what is left. The holdout teacher's reserve is drawn after it from
    the same split, class-balanced too.
    """
    dataset = datasets.load(data["dataset"], data["data-dir"], data["image-size"], with_train=source_name == "train")
    source = datasets.align_images(source_name, data["data-dir"], dataset.classes)
    labels = dataset.train.labels if source is None else source.labels
    rng = np.random.default_rng(data["seed"])
    align = balanced_subset(labels, data["align-per-class"], rng)
    empty = np.zeros(0, dtype=np.int64)
    held = empty
    if data["holdout-per-class"] and source is None:
        rest = np.setdiff1d(np.arange(len(labels)), align)
        held = holdout_reserve(labels, rest, data["holdout-per-class"], dataset.num_classes, rng)
    split = Split(align, empty, [], dataset.num_classes, source is None, held)
    return Prepared(dataset, split, dataset.train if source is None else source)


@lru_cache(maxsize=2)
def _prepare(key: tuple, source_name: str) -> Prepared:
    """Cached on `Settings.data_key` (the settings that determine the split, read here by key) and the
    resolved `Settings.align_source`, so runs that differ only in training settings share one split."""
    data = dict(key)
    if data["client-data"] == LOCAL:
        return _server_only(data, source_name)
    dataset = datasets.load(data["dataset"], data["data-dir"], data["image-size"])
    source = datasets.align_images(source_name, data["data-dir"], dataset.classes)
    split = make_split(
        dataset.train.labels,
        dataset.num_classes,
        data["imbalance-factor"],
        data["align-per-class"],
        data["num-clients"],
        data["dirichlet-alpha"],
        data["min-partition-size"],
        data["seed"],
        partitioner=data["partitioner"],
        align_labels=None if source is None else source.labels,
        holdout=data["holdout-per-class"],
    )
    return Prepared(dataset, split, dataset.train if source is None else source)


def prepare(cfg: Settings) -> Prepared:
    """Dataset and split for a validated config (cached on the settings that determine them)."""
    return _prepare(cfg.data_key, cfg.align_source)


PARTITION_KEY = "partition-id"  # Flower's node-config key; a server message names the partition it is for by it


@lru_cache(maxsize=64)
def _client_batches(key: tuple, batch_size: int, partition_id: int, compute: Compute) -> Batches:
    data_key, source_name = key
    prep = _prepare(data_key, source_name)
    part = prep.dataset.train.subset(prep.split.clients[partition_id])
    return Batches(part, prep.dataset, dict(data_key)["image-size"], batch_size, compute)


def client_batches(cfg: Settings, partition_id: int) -> Batches:
    """One client's share of the long-tailed pool, ready for local training on this process's device (cached on
    the data settings, so variants of the run's settings share it)."""
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(f"partition-id {partition_id} is outside 0..{cfg.num_clients - 1} (num-clients).")
    return _client_batches((cfg.data_key, cfg.align_source), cfg.batch_size, partition_id, compute_of(cfg))


def batches(cfg: Settings, images: ImageSet, batch_size: int) -> Batches:
    """Any image set of the run's dataset in batches on this process's device (server sets, teachers)."""
    return Batches(images, prepare(cfg).dataset, cfg.image_size, batch_size, compute_of(cfg))

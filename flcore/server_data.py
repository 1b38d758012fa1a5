"""What the ServerApp holds of a run's data: the test split in batches, D_align, the long-tail bookkeeping,
and what every request to a node holding its own images must carry (the class names)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flcore.batches import Batches
from flcore.config import Settings
from flcore.datasets import Dataset, ImageSet
from flcore.local_data import CLASSES_KEY
from flcore.partition import class_groups
from flcore.run_data import batches, prepare


def client_classes(cfg: Settings) -> dict[str, list[str]]:
    """What every request to a node must carry for it to label its own images: the class names, in the
    server's order, when the nodes hold their own data (client-data=local); nothing otherwise."""
    return {CLASSES_KEY: list(prepare(cfg).dataset.classes)} if cfg.local_data else {}


@dataclass(frozen=True)
class ServerData:
    """What the server holds: the balanced test split, D_align, and the long-tail bookkeeping (with
    client-data=local the server knows no pool: zero counts, no clients, empty class groups), with the
    holdout teacher's reserve (`Split.reserve`; empty for other teachers)."""

    dataset: Dataset
    test: Batches
    align: ImageSet
    pool_counts: np.ndarray
    client_histogram: np.ndarray
    groups: dict[str, list[int]]
    reserve: dict = field(default_factory=dict)


def align_set(cfg: Settings) -> ImageSet:
    """D_align: the server's class-balanced images, from the training split or `align-data`'s source."""
    prep = prepare(cfg)
    return prep.align_source.subset(prep.split.align)


def server_data(cfg: Settings) -> ServerData:
    """What the ServerApp holds; the test split moves to the device here, once per run."""
    prep = prepare(cfg)
    labels = prep.dataset.train.labels
    counts = prep.split.pool_counts(labels)
    groups = class_groups(counts, cfg.many_threshold, cfg.few_threshold)
    if cfg.local_data:  # no pool is known before training, so no class can be put in a group
        groups = {name: [] for name in groups}
    test = batches(cfg, prep.dataset.test, cfg.eval_batch_size)
    histogram, reserve = prep.split.client_histogram(labels), prep.split.reserve(labels)
    return ServerData(prep.dataset, test, align_set(cfg), counts, histogram, groups, reserve)

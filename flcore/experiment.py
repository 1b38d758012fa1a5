"""What a run's configuration determines on each side: the dataset, its split, and the model weights.

With `client-data=partition` the server and each client call these with the same config and get the same
split; results are cached per process, so a simulated client (a Ray actor serving many partitions) decodes
the dataset once and never reloads data between rounds. With `client-data=local` the clients hold their own
images (`flcore.local_data`): the server reads only its test split and D_align, and there is no split.
Batches and models are made on the process's device (`flcore.device.compute_of`): a client's partition
moves there once, when its batches are first made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from flcore import data as datasets
from flcore.config import LOCAL, align_source, data_key
from flcore.data import Batches, Dataset, ImageSet
from flcore.device import Compute, compute_of
from flcore.local_data import CLASSES_KEY
from flcore.models import FLModel, run_model
from flcore.partition import Split, balanced_subset, class_groups, make_split


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
    long tail, since no pool is cut from what is left.
    """
    source_name = align_source(cfg)
    dataset = datasets.load(cfg["dataset"], cfg["data-dir"], cfg["image-size"], with_train=source_name == "train")
    source = datasets.align_images(source_name, cfg["data-dir"], dataset.classes)
    labels = dataset.train.labels if source is None else source.labels
    align = balanced_subset(labels, cfg["align-per-class"], np.random.default_rng(cfg["seed"]))
    empty = np.zeros(0, dtype=np.int64)
    split = Split(align, empty, [], dataset.num_classes, align_from_train=source is None)
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
    )
    return Prepared(dataset, split, dataset.train if source is None else source)


def prepare(cfg: Mapping) -> Prepared:
    """Dataset and split for a validated config (cached on the settings that determine them)."""
    return _prepare(data_key(cfg))


PARTITION_KEY = "partition-id"  # Flower's node-config key; a server message names the partition it is for by it


def client_classes(cfg: Mapping) -> dict[str, list[str]]:
    """What every request to a node must carry for it to label its own images: the class names, in the
    server's order, when the nodes hold their own data (client-data=local); nothing otherwise."""
    return {CLASSES_KEY: list(prepare(cfg).dataset.classes)} if cfg["client-data"] == LOCAL else {}


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


@dataclass(frozen=True)
class ServerData:
    """What the server holds: the balanced test split, D_align, and the long-tail bookkeeping (with
    client-data=local the server knows no pool: zero counts, no clients, empty class groups)."""

    dataset: Dataset
    test: Batches
    align: ImageSet
    pool_counts: np.ndarray
    client_histogram: np.ndarray
    groups: dict[str, list[int]]


def align_set(cfg: Mapping) -> ImageSet:
    """D_align: the server's class-balanced images, from the training split or `align-data`'s source."""
    prep = prepare(cfg)
    return prep.align_source.subset(prep.split.align)


def server_data(cfg: Mapping) -> ServerData:
    """What the ServerApp holds; the test split moves to the device here, once per run."""
    prep = prepare(cfg)
    labels = prep.dataset.train.labels
    counts = prep.split.pool_counts(labels)
    groups = class_groups(counts, cfg["many-threshold"], cfg["few-threshold"])
    if cfg["client-data"] == LOCAL:  # no pool is known before training, so no class can be put in a group
        groups = {name: [] for name in groups}
    test = batches(cfg, prep.dataset.test, int(cfg["eval-batch-size"]))
    return ServerData(prep.dataset, test, align_set(cfg), counts, prep.split.client_histogram(labels), groups)


def to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def load_state(model: nn.Module, received: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load weights, casting each to the model's own dtype (FedAvg returns float64 counters)."""
    state = model.state_dict()
    missing = sorted(set(state) - set(received))
    if missing:
        raise KeyError(f"received weights lack {len(missing)} of the model's entries, e.g. {missing[:3]}")
    model.load_state_dict({k: received[k].to(state[k].dtype) for k in state})
    return model


def load_record(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    return load_state(model, arrays.to_torch_state_dict())


def new_model(cfg: Mapping, seed: int | None = None) -> FLModel:
    """A model of the run's architecture on this process's device (initialised on the CPU from `seed`)."""
    return run_model(cfg, prepare(cfg).dataset.num_classes, seed=seed, device=compute_of(cfg).device)


def model_from(cfg: Mapping, arrays: ArrayRecord) -> FLModel:
    """A fresh model of the run's architecture holding `arrays`, for server-side methods that run the model."""
    return load_record(new_model(cfg), arrays)


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator seeded from several integers (seed, round, partition), stable across processes."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))

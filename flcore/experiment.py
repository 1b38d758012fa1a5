"""What a run's configuration determines on each side: the dataset, its split, and the model weights.

The server and each client call these with the same config and get the same split; results are cached
per process, so a simulated client (a Ray actor serving many partitions) decodes the dataset once and
never reloads data between rounds.
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
from flcore.config import align_source, data_key
from flcore.data import Batches, Dataset, ImageSet
from flcore.models import FLModel, build_model
from flcore.partition import Split, class_groups, make_split


@dataclass(frozen=True)
class Prepared:
    """The dataset, its split, and the set D_align's indices point into (the training split unless
    `align-data` names another source)."""

    dataset: Dataset
    split: Split
    align_source: ImageSet


@lru_cache(maxsize=2)
def _prepare(key: tuple) -> Prepared:
    cfg = dict(key)
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


@lru_cache(maxsize=64)
def _client_batches(key: tuple, batch_size: int, partition_id: int) -> Batches:
    prep = _prepare(key)
    cfg = dict(key)
    part = prep.dataset.train.subset(prep.split.clients[partition_id])
    return Batches(part, prep.dataset, cfg["image-size"], batch_size)


def client_batches(cfg: Mapping, partition_id: int) -> Batches:
    """One client's share of the long-tailed pool, ready for local training."""
    if not 0 <= partition_id < cfg["num-clients"]:
        raise ValueError(f"partition-id {partition_id} is outside 0..{cfg['num-clients'] - 1} (num-clients).")
    return _client_batches(data_key(cfg), int(cfg["batch-size"]), partition_id)


@dataclass(frozen=True)
class ServerData:
    """What the server holds: the balanced test split, D_align, and the long-tail bookkeeping."""

    dataset: Dataset
    test: Batches
    align: ImageSet
    pool_counts: np.ndarray
    client_histogram: np.ndarray
    groups: dict[str, list[int]]


def server_data(cfg: Mapping) -> ServerData:
    prep = prepare(cfg)
    labels = prep.dataset.train.labels
    counts = prep.split.pool_counts(labels)
    test = Batches(prep.dataset.test, prep.dataset, cfg["image-size"], cfg["eval-batch-size"])
    return ServerData(
        prep.dataset,
        test,
        prep.align_source.subset(prep.split.align),
        counts,
        prep.split.client_histogram(labels),
        class_groups(counts, cfg["many-threshold"], cfg["few-threshold"]),
    )


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


def model_from(cfg: Mapping, arrays: ArrayRecord) -> FLModel:
    """A fresh model of the run's architecture holding `arrays`, for server-side methods that run the model."""
    model = build_model(str(cfg["model"]), int(cfg["projection-dim"]), prepare(cfg).dataset.num_classes)
    return load_record(model, arrays)


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator seeded from several integers (seed, round, partition), stable across processes."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))

"""The run's model: its architecture and class count come from the config and the dataset it names."""

from __future__ import annotations

from flwr.app import ArrayRecord

from flcore.arrays import load_record
from flcore.config import Settings
from flcore.device import compute_of
from flcore.models import FLModel, run_model
from flcore.run_data import prepare


def new_model(cfg: Settings, seed: int | None = None) -> FLModel:
    """A model of the run's architecture on this process's device (initialised on the CPU from `seed`)."""
    return run_model(cfg, prepare(cfg).dataset.num_classes, seed=seed, device=compute_of(cfg).device)


def model_from(cfg: Settings, arrays: ArrayRecord) -> FLModel:
    """A fresh model of the run's architecture holding `arrays`, for server-side methods that run the model."""
    return load_record(new_model(cfg), arrays)

"""Every check that can fail before round 1, in one place, run before any Flower process starts.

The launcher calls `preflight` before it starts the SuperLink and Ray; the ServerApp calls it again
first thing (a run started with `flwr run` on a real SuperLink has no launcher). It validates the
config, resolves `device` and `amp` in this process (a GPU it does not see names the key), reads the
checkpoint to resume from, loads the dataset and draws the split (a split the settings cannot produce
names the key to change), decodes the image files (`flcore.images`), estimates
the memory a training process needs (`flcore.memory`) and the size of the clients' uploads, and runs
the strategy's and every server stage's own checks (teachers' weights on disk, class names, logits files, pretraining
data). Each problem is a `ConfigError` or `DataNotFound` naming the key or file; the launcher prints it
on one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flcore import data as datasets
from flcore.class_statistics import upload_bytes
from flcore.config import LOCAL, ConfigError, validate
from flcore.data import DataNotFound
from flcore.device import compute_of
from flcore.experiment import Prepared, prepare
from flcore.images import check_images
from flcore.memory import check_memory
from flcore.models import classifier_width, model_head
from rounds import checkpoint
from rounds.delegate import Delegating
from strategies.calibration import ClientUploads, UploadsAfterAggregation
from strategies.registry import SERVER_STAGES, STRATEGIES, build_strategy, check_strategy

InputError = (ConfigError, DataNotFound)
UPLOADERS = (ClientUploads, UploadsAfterAggregation)  # strategies whose clients upload class statistics


def validated(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config checked against the schema, with the registry's strategy names."""
    return validate(run_config, choices={"strategy": STRATEGIES})


@dataclass(frozen=True)
class Checked:
    """What the checks read on the way: the data and split, and the checkpoint to resume from (or None)."""

    prepared: Prepared
    resumed: checkpoint.Checkpoint | None
    images: str = ""


def preflight(cfg: Mapping[str, Any]) -> Checked:
    """Raise `ConfigError` / `DataNotFound` on the first problem, before anything trains."""
    compute_of(cfg)
    resumed = checkpoint.load(cfg) if cfg["resume"] else None
    prepared = prepared_data(cfg)
    images = check_image_files(cfg, prepared)
    check_memory(cfg, prepared.dataset.num_classes)
    check_upload_size(cfg, prepared.dataset.num_classes)
    check_strategy(cfg, prepared)
    for entry in SERVER_STAGES.values():
        entry.check(cfg, prepared)
    return Checked(prepared, resumed, images)


def prepared_data(cfg: Mapping[str, Any]) -> Prepared:
    """The dataset and split; a failure names the data folder, or the split key the data cannot satisfy."""
    try:
        return prepare(cfg)
    except DataNotFound:
        raise
    except Exception as err:  # a split's refusal, a loader's or flwr-datasets' own error: say which input
        if cfg["client-data"] != LOCAL:
            raise explain_failure(cfg, err) from err
        if isinstance(err, ConfigError):  # no split is drawn: D_align's source names its key itself
            raise
        raise unreadable(cfg, err) from err


def unreadable(cfg: Mapping[str, Any], err: Exception) -> DataNotFound:
    where = Path(str(cfg["data-dir"])).expanduser() if cfg["data-dir"] else "scikit-learn"
    return DataNotFound(f"dataset '{cfg['dataset']}' in '{where}' cannot be read ({type(err).__name__}: {err}).")


def explain_failure(cfg: Mapping[str, Any], err: Exception) -> Exception:
    """Reload the dataset alone: if that fails the data is unreadable, otherwise the split settings are at fault."""
    try:
        labels = datasets.load(str(cfg["dataset"]), str(cfg["data-dir"]), int(cfg["image-size"])).train.labels
    except Exception as load_err:
        return unreadable(cfg, load_err)
    counts = np.bincount(labels)
    smallest = int(counts.min())
    if cfg["align-per-class"] >= smallest:
        return ConfigError(
            f"run-config key 'align-per-class' = {cfg['align-per-class']} is not allowed for this dataset: its "
            f"smallest class has {smallest} training images, and D_align would leave none of them to the clients; "
            f"expected < {smallest}."
        )
    pool = len(labels) - int(np.minimum(counts, cfg["align-per-class"]).sum())
    if cfg["num-clients"] * max(1, cfg["min-partition-size"]) > pool:
        return ConfigError(
            f"run-config key 'num-clients' = {cfg['num-clients']} is not allowed for this dataset: at most {pool} "
            f"images are left for the clients, fewer than num-clients x min-partition-size "
            f"({cfg['min-partition-size']})."
        )
    if isinstance(err, ConfigError):  # already names its key
        return err
    return ConfigError(
        f"run-config keys num-clients = {cfg['num-clients']}, min-partition-size = {cfg['min-partition-size']}, "
        f"dirichlet-alpha = {cfg['dirichlet-alpha']}, imbalance-factor = {cfg['imbalance-factor']}: the data split "
        f"failed ({type(err).__name__}: {err})."
    )


def check_image_files(cfg: Mapping[str, Any], prepared: Prepared) -> str:
    """Decode the image files the run reads from data-dir (train images of D_align and the pool, all test
    images); nodes holding their own data (client-data=local) check theirs when they read them."""
    train, test = prepared.dataset.train, prepared.dataset.test
    if train.files is None:
        return ""
    align = prepared.split.align if prepared.split.align_from_train else np.zeros(0, dtype=np.int64)
    used = np.concatenate([align, prepared.split.pool])
    which = check_images([train.files[i] for i in used], "data-dir", int(cfg["seed"]))
    which_test = check_images(list(test.files or ()), "data-dir", int(cfg["seed"]))
    return f"images checked: train {which}, test {which_test}"


def check_upload_size(cfg: Mapping[str, Any], num_classes: int) -> None:
    """A strategy whose clients upload class statistics (CCVR, CReFF) must fit them in `max-upload-mb`, or the
    server would reject every reply of the rounds that need them."""
    strategy = build_strategy(cfg)
    while isinstance(strategy, Delegating) and not isinstance(strategy, UPLOADERS):
        strategy = strategy.inner
    if not isinstance(strategy, UPLOADERS):
        return
    dim = classifier_width(cfg)
    need = upload_bytes(strategy.upload, num_classes, dim)
    if need > float(cfg["max-upload-mb"]) * 2**20:
        raise ConfigError(
            f"run-config key 'max-upload-mb' = {cfg['max-upload-mb']} is not allowed for strategy={cfg['strategy']}: "
            f"each client's '{strategy.upload}' upload is {need / 2**20:.1f} MB ({num_classes} classes, {dim}-d "
            f"classifier input, head={model_head(cfg)}); expected >= {need / 2**20:.1f}."
        )

"""A stand-in teacher for offline runs: a model trained centrally on labelled images no one else holds.

Offline there is no real CLIP: the `tiny` teacher has random weights and carries no knowledge, so stage 3
would run with beta forced to 0 and the KL term, the heart of the paper's alignment, would never carry a
signal. `align-teacher=holdout` trains a model on the server, once per data settings, on the training
images that the recipe leaves out: in no client's partition, not in D_align, not in the test split (on
digits and CIFAR, the images the long-tailed cut drops). Its logits play the role of CLIP's zero-shot
logits q: it knows the classes from data no client holds, as CLIP knows them from web data, so the
mechanism can be seen and tested. Every output made with it says it is this stand-in, not CLIP.

The trained weights are cached under `<output-dir>/teacher-cache/`, keyed by everything that determines
them, so reruns, and CLIP2FL's clients (which distil from the same stand-in in place of the random
CLIP), load them instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flcore.config import LOCAL, ConfigError, data_key
from flcore.data import ImageSet
from flcore.device import compute_of
from flcore.experiment import Prepared, batches, prepare, seeded_generator
from flcore.files import atomic_write
from flcore.models import build_model
from flcore.training import TrainSettings, train

HOLDOUT = "holdout"
STREAM = 2_000_003  # generator stream of the stand-in's training, apart from clients and alignment
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # centralized training, as a supervised baseline would use
KEYS = ("holdout-model", "holdout-epochs", "holdout-lr", "batch-size", "projection-dim", "augment")


def label(n_images: int, model: str) -> str:
    """What every output calls this teacher."""
    return (
        f"holdout stand-in for CLIP: {model} trained centrally on {n_images} held-out server images "
        "(in no client's partition, not in D_align, not in the test split)"
    )


def holdout_indices(prepared: Prepared) -> np.ndarray:
    """Training-split indices in neither the long-tailed pool (every client's data) nor D_align."""
    used = np.union1d(prepared.split.pool, prepared.split.align)
    return np.setdiff1d(np.arange(len(prepared.dataset.train)), used)


def check(cfg: Mapping, prepared: Prepared) -> None:
    """Refuse the stand-in when the recipe leaves no image over (IF = 1 puts every image in the pool)."""
    if len(holdout_indices(prepared)) == 0 and cfg["client-data"] == LOCAL:
        raise ConfigError(
            "run-config key 'align-teacher' = 'holdout' needs training images of the server's own in data-dir that "
            "are not in D_align, and the server reads none (client-data = local, align-data from a folder); use "
            "align-data = train with a data-dir that has a training split, another teacher, or align-logits-file."
        )
    if len(holdout_indices(prepared)) == 0:
        raise ConfigError(
            "run-config key 'align-teacher' = 'holdout' needs training images that are in no client's partition "
            f"and not in D_align, and none is left over (imbalance-factor = {cfg['imbalance-factor']} keeps every "
            "image in the pool); use imbalance-factor > 1, another teacher, or align-logits-file."
        )


def _cache_file(cfg: Mapping) -> Path:
    body = json.dumps({"data": list(data_key(cfg)), "teacher": {k: cfg[k] for k in KEYS}}, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()[:20]
    return Path(str(cfg["output-dir"])).expanduser() / "teacher-cache" / f"holdout-{digest}.pt"


def _model(cfg: Mapping, num_classes: int, seed: int | None = None) -> nn.Module:
    """The stand-in's architecture on the run's device."""
    dim, device = int(cfg["projection-dim"]), compute_of(cfg).device
    return build_model(str(cfg["holdout-model"]), dim, num_classes, seed=seed, device=device)


def _train(cfg: Mapping, prepared: Prepared, held: np.ndarray) -> nn.Module:
    dataset, seed = prepared.dataset, int(cfg["seed"])
    model = _model(cfg, dataset.num_classes, seed=seed)
    data = batches(cfg, dataset.train.subset(held), int(cfg["batch-size"]))
    settings = TrainSettings(
        int(cfg["holdout-epochs"]), float(cfg["holdout-lr"]), MOMENTUM, WEIGHT_DECAY, bool(cfg["augment"])
    )
    print(f"[teacher] training the {label(len(held), str(cfg['holdout-model']))}", flush=True)
    train(model, data, settings, seeded_generator(seed, STREAM), compute=compute_of(cfg))
    return model


def load_or_train(cfg: Mapping) -> tuple[nn.Module, str]:
    """The stand-in teacher (from the cache, or trained once and cached) and its label."""
    prepared = prepare(cfg)
    check(cfg, prepared)
    held = holdout_indices(prepared)
    model = _model(cfg, prepared.dataset.num_classes)
    path = _cache_file(cfg)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        model = _train(cfg, prepared, held)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return model.eval(), label(len(held), str(cfg["holdout-model"]))


@torch.no_grad()
def logits(cfg: Mapping, model: nn.Module, images: ImageSet) -> torch.Tensor:
    """The teacher's logits [N, C] over `images`, in order, computed on the run's device in float32 and returned
    on the CPU (they are cached like CLIP's)."""
    model.eval()
    return torch.cat([model(x) for x, _ in batches(cfg, images, 256).iterate()]).float().cpu()

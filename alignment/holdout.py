"""A stand-in teacher for offline runs: a model trained centrally on labelled images no one else holds.

Offline there is no real CLIP: the `tiny` teacher has random weights and carries no knowledge, so stage 3
would run with beta forced to 0 and the KL term, the heart of the paper's alignment, would never carry a
signal. `align-teacher=holdout` trains a model on the server, once per data settings, on a class-balanced
reserve of training images (`holdout-per-class` of every class) that the recipe draws after D_align and
before the long-tailed cut (`flcore.partition`): in no client's partition, not in D_align, not in the test
split. Its logits play the role of CLIP's zero-shot logits q: it knows every class about equally, from
data no client holds, as CLIP knows them from web data, so the mechanism can be seen and tested. (The
images the long-tailed cut drops would not do: they are a reversed long tail with none of the head class.)
Every output made with it says it is this stand-in, not CLIP; `holdout-teacher.json` and the summary give
its training images per class, its test accuracy, and the images per class the pool gave up for it.

The trained weights are cached under `<output-dir>/teacher-cache/`, keyed by everything that determines
them, so reruns, and CLIP2FL's clients (which distil from the same stand-in in place of the random
CLIP), load them instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flcore.config import ConfigError, Settings
from flcore.datasets import Dataset, ImageSet
from flcore.device import compute_of
from flcore.files import atomic_write
from flcore.models import build_model
from flcore.progress import progress
from flcore.run_data import Prepared, batches, prepare
from flcore.seeding import seeded_generator
from flcore.training import TrainSettings, train
from rounds.stage import ServerContext, Stages

HOLDOUT = "holdout"
STREAM = 2_000_003  # generator stream of the stand-in's training, apart from clients and alignment
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # centralized training, as a supervised baseline would use
KEYS = ("holdout-model", "holdout-epochs", "holdout-lr", "batch-size", "projection-dim", "augment")


def label(n_images: int, model: str) -> str:
    """What every output calls this teacher."""
    return (
        f"holdout stand-in for CLIP: {model} trained centrally on {n_images} held-out server images, class-balanced "
        "(in no client's partition, not in D_align, not in the test split)"
    )


def holdout_indices(prepared: Prepared) -> np.ndarray:
    """The reserve's training-split indices: class-balanced, in neither the long-tailed pool nor D_align."""
    return prepared.split.holdout


def check(cfg: Settings, prepared: Prepared) -> None:
    """Refuse the stand-in when the server holds no reserve: the split refuses a class with too few images
    itself (`flcore.partition.holdout_reserve`), so this is a server that reads no training split."""
    if len(holdout_indices(prepared)) == 0:
        raise ConfigError(
            "run-config key 'align-teacher' = 'holdout' needs training images of the server's own in data-dir that "
            f"are not in D_align, and the server reads none (client-data = {cfg.client_data}, align-data = "
            f"{cfg.align_data!r}); use align-data = train with a data-dir that has a training split, another "
            "teacher, or align-logits-file."
        )


def check_reserve(cfg: Settings, prepared: Prepared) -> None:
    """The registry's check of the report stage: with the holdout teacher, its reserve must exist."""
    if cfg.holdout_teacher:
        check(cfg, prepared)


def _cache_file(cfg: Settings) -> Path:
    body = json.dumps({"data": list(cfg.data_key), "teacher": {k: cfg[k] for k in KEYS}}, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()[:20]
    return Path(cfg.output_dir).expanduser() / "teacher-cache" / f"holdout-{digest}.pt"


def _model(cfg: Settings, num_classes: int, seed: int | None = None) -> nn.Module:
    """The stand-in's architecture on the run's device."""
    dim, device = cfg.projection_dim, compute_of(cfg).device
    return build_model(cfg.holdout_model, dim, num_classes, seed=seed, device=device)


def _train(cfg: Settings, prepared: Prepared, held: np.ndarray) -> nn.Module:
    dataset, seed = prepared.dataset, cfg.seed
    model = _model(cfg, dataset.num_classes, seed=seed)
    data = batches(cfg, dataset.train.subset(held), cfg.batch_size)
    settings = TrainSettings(cfg.holdout_epochs, cfg.holdout_lr, MOMENTUM, WEIGHT_DECAY, cfg.augment)
    print(f"[teacher] training the {label(len(held), cfg.holdout_model)}", flush=True)
    train(model, data, settings, seeded_generator(seed, STREAM), compute=compute_of(cfg), progress="teacher")
    return model


def load_or_train(cfg: Settings) -> tuple[nn.Module, str]:
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
    return model.eval(), label(len(held), cfg.holdout_model)


def accuracy_on_test_split(cfg: Settings, model: nn.Module, dataset: Dataset) -> tuple[float, list[float]]:
    """The stand-in's accuracy on the test split, overall and per class (recall)."""
    predicted = logits(cfg, model, dataset.test).argmax(1).numpy()
    labels = dataset.test.labels
    per_class = [float((predicted[labels == c] == c).mean()) for c in range(dataset.num_classes)]
    return float((predicted == labels).mean()), per_class


def report_stage(cfg: Settings, ctx: ServerContext) -> Stages:
    """The registry factory: with the holdout teacher, the summary's `holdout-teacher` section (no stage).

    Every such run reports it, also one that sets the teacher only to share the pool of runs using it; the
    teacher is trained once per data settings (cached), so that costs a load and one pass over the test split.
    """
    if not cfg.holdout_teacher:
        return Stages()
    model, source = load_or_train(cfg)
    accuracy, per_class = accuracy_on_test_split(cfg, model, ctx.data.dataset)
    info = {
        "teacher": source,
        "holdout-per-class": cfg.holdout_per_class,
        **ctx.data.reserve,
        "test-accuracy": accuracy,
        "per-class-test-accuracy": per_class,
    }
    print(f"[teacher] {source}: test accuracy {accuracy:.3f}", flush=True)
    return Stages(sections={"holdout-teacher": info})


@torch.no_grad()
def logits(cfg: Settings, model: nn.Module, images: ImageSet) -> torch.Tensor:
    """The teacher's logits [N, C] over `images`, in order, computed on the run's device in float32 and returned
    on the CPU (they are cached like CLIP's)."""
    model.eval()
    data = batches(cfg, images, 256)
    chunks = progress(data.iterate(), total=len(data), desc="teacher logits", unit="batch")
    return torch.cat([model(x) for x, _ in chunks]).float().cpu()

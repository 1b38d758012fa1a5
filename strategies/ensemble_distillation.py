"""What FedDF and FedBE share on the server: the round's client models, and distilling an ensemble of models
into the global model on unlabeled server images.

Both methods keep FedAvg's clients as they are (clients upload their weights, nothing else) and change
what the server does with the weights after averaging (`strategies.feddf`, `strategies.fedbe`).
`ClientModels` wraps any strategy and keeps the model it sent this round and, from the replies it
aggregates, each client's weights; after the inner aggregation it hands them, with the averaged model, to
the method's `Fuse`, whose result becomes the next global model.

The unlabeled images are `distill-data`. Both papers distil on a large unlabeled set (FedDF: CIFAR-100 or
ImageNet for CIFAR-10; FedBE's code: the training images no client holds), so the default `unused-train`
is the training images the recipe gives neither D_align nor any client: on a long-tailed pool, the bulk of
the training split (863 of the 1,258 digits images at IF 100; about 37,500 of CIFAR-10's 50,000). `align`
is D_align's images with their labels dropped; a folder is every image in it. The ensemble's soft labels
are computed once per round on the images as they are (no augmentation), and the student learns them
with KL(targets || student) at temperature 1 (`kd_loss`). All of it runs on the run's device and
precision (`flcore.device`); the targets stay there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy
from torch import nn

from flcore.arrays import load_record, reply_arrays
from flcore.batches import Batches
from flcore.config import DISTILL_ON_ALIGN, DISTILL_ON_UNHELD, DISTILL_SOURCES, ConfigError, Settings
from flcore.datasets import ImageSet
from flcore.device import CPU, Compute
from flcore.images import IMAGE_SUFFIXES, check_images, image_files
from flcore.losses import kd_loss
from flcore.progress import progress
from flcore.run_data import Prepared, batches, prepare
from flcore.run_model import model_from
from flcore.server_data import align_set
from rounds.delegate import FromSentModel

MIN_IMAGES = 1  # FedDF and FedBE need images to distil on; FedDF validates on D_align, not on these


@dataclass(frozen=True)
class RoundModels:
    """One round's models: the one the server sent (`start`), the clients' replies and their average."""

    server_round: int
    start: ArrayRecord
    averaged: ArrayRecord
    clients: list[ArrayRecord]


# (the round's models, the round's metrics to add to) -> next global model
Fuse = Callable[[RoundModels, MetricRecord], ArrayRecord]


class ClientModels(FromSentModel):
    """Any strategy, whose aggregated model is then fused with the round's client models by `fuse`."""

    def __init__(self, inner: Strategy, fuse: Fuse, name: str) -> None:
        super().__init__(inner)
        self.fuse, self.name = fuse, name

    def summary(self) -> None:
        log(INFO, "\t├──> %s: the server distils the round's client models into the average", self.name)
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        averaged, metrics = self.inner.aggregate_train(server_round, replies)
        if averaged is None:
            return None, metrics
        clients = [reply_arrays(r.content) for r in replies if not r.has_error()]
        start = averaged if self.sent is None else self.sent
        metrics = MetricRecord() if metrics is None else metrics
        return self.fuse(RoundModels(server_round, start, averaged, clients), metrics), metrics


def folder_images(root: Path) -> tuple[str, ...]:
    """Every image file under `root`, searched recursively, in a stable order."""
    return tuple(str(p) for p in image_files(root))


def unheld_train(prepared: Prepared) -> np.ndarray:
    """Positions in the training split of the images the recipe gives neither D_align nor the clients' pool:
    those the long tail cuts away (none at imbalance-factor 1)."""
    split = prepared.split
    held = [split.pool, split.align] if split.align_from_train else [split.pool]
    return np.setdiff1d(np.arange(len(prepared.dataset.train)), np.concatenate(held))


def without_labels(images: ImageSet) -> ImageSet:
    """`images` with every label 0: nothing downstream can read a label the method must not use."""
    return dataclasses.replace(images, labels=np.zeros(len(images), dtype=np.int64))


def unlabeled_images(cfg: Settings) -> ImageSet:
    """The images the server distils on (`distill-data`), labels replaced by placeholders."""
    source = cfg.distill_data
    if source == DISTILL_ON_UNHELD:
        prepared = prepare(cfg)
        return without_labels(prepared.dataset.train.subset(unheld_train(prepared)))
    if source == DISTILL_ON_ALIGN:
        return without_labels(align_set(cfg))
    files = folder_images(Path(source).expanduser())
    return ImageSet(np.zeros(len(files), dtype=np.int64), files=files)


def batches_of(cfg: Settings, images: ImageSet) -> Batches:
    """`images` in `distill-batch-size` batches, normalised like the dataset, on the run's device."""
    return batches(cfg, images, cfg.distill_batch_size)


def check(cfg: Settings, prepared: Prepared) -> None:
    """The preflight's check for FedDF and FedBE: the server holds unlabeled images to distil on, and the image
    files among the unheld training images decode."""
    source = cfg.distill_data
    if source == DISTILL_ON_UNHELD and cfg.local_data:
        raise ConfigError(
            f"run-config key 'distill-data' = {source!r} is not allowed with client-data=local: the server does not "
            f"know which training images the nodes hold; expected {DISTILL_ON_ALIGN} or a folder of unlabeled images."
        )
    if source == DISTILL_ON_UNHELD:
        unheld = unheld_train(prepared)
        found = len(unheld)
        where = "the training split outside D_align and the clients' pool (at imbalance-factor 1 the pool is all of it)"
        files = prepared.dataset.train.files
        if files is not None and found:
            check_images([files[i] for i in unheld], "distill-data", cfg.seed)
    elif source == DISTILL_ON_ALIGN:
        found, where = len(prepared.split.align), "D_align"
    else:
        found, where = len(folder_images(Path(source).expanduser())), f"the folder {source!r}"
    if found < MIN_IMAGES:
        raise ConfigError(
            f"run-config key 'distill-data' = {source!r}: {where} holds {found} image(s); strategy "
            f"{cfg.strategy} distils the clients' ensemble on the server on unlabeled images; expected "
            f"{' or '.join(s for s in DISTILL_SOURCES if s != source)} or a folder of "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} files."
        )


@torch.no_grad()
def logits_of(model: nn.Module, data: Batches, compute: Compute = CPU) -> torch.Tensor:
    """The model's float32 logits on every image of `data`, in order (eval mode)."""
    model.eval()
    with compute.autocast():
        return torch.cat([model(x).float() for x, _ in data.iterate()])


def ensemble_logits(
    cfg: Settings, members: list[ArrayRecord], data: Batches, compute: Compute = CPU
) -> list[torch.Tensor]:
    """Each member model's logits on the unlabeled images, computed with one model object refilled per member."""
    model = model_from(cfg, members[0])
    return [
        logits_of(load_record(model, arrays), data, compute)
        for arrays in progress(members, desc="ensemble logits", unit="model")
    ]


def shuffled(data: Batches, targets: torch.Tensor, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """One pass over the images in a seeded random order, each batch with its target log-probabilities."""
    for idx, x, _ in data.iterate_indexed(shuffle=True, gen=gen):
        yield x, targets[idx]


class Distiller:
    """Optimiser steps on KL(target || student), targets given as log-probabilities, in the run's precision;
    with `max_norm` the gradients' total norm is clipped to it before each step (FedDF's 5)."""

    def __init__(
        self, student: nn.Module, opt: torch.optim.Optimizer, compute: Compute, max_norm: float | None = None
    ) -> None:
        self.student, self.opt, self.compute, self.max_norm = student, opt, compute, max_norm
        self.scaler = compute.scaler()

    def step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One step; returns the loss, left on the device (reading it would wait for the GPU every step)."""
        with self.compute.autocast():
            loss = kd_loss(self.student(x).float(), target, 1.0)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.max_norm is not None:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not fp16's scaled ones
            nn.utils.clip_grad_norm_(self.student.parameters(), self.max_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach()

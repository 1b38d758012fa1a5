"""What FedDF and FedBE share on the server: the round's client models, and distilling an ensemble of models
into the global model on unlabeled server images.

Both methods keep FedAvg's clients as they are (clients upload their weights, nothing else) and change
what the server does with the weights after averaging (`strategies.feddf`, `strategies.fedbe`).
`ClientModels` wraps any strategy and keeps, from the replies it aggregates, each client's weights and
sample count; after the inner aggregation it hands them, with the averaged model, to the method's `Fuse`,
whose result becomes the next global model.

The unlabeled images are `distill-data`: D_align's images with their labels dropped (`align`), or every
image in a folder. The ensemble's soft labels are computed once per round on the images as they are
(no augmentation), and the student learns them with KL(targets || student) at temperature 1 (`kd_loss`).
All of it runs on the run's device and precision (`flcore.device`); the targets stay there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy
from torch import nn

from flcore.config import DISTILL_ON_ALIGN, ConfigError
from flcore.data import IMAGE_SUFFIXES, Batches, ImageSet
from flcore.device import CPU, Compute
from flcore.experiment import Prepared, align_set, batches, load_record, model_from
from flcore.losses import kd_loss
from rounds.delegate import Delegating

MIN_IMAGES = 2  # FedDF distils on some and holds at least one out for early stopping
# (round, averaged model, client models, their sample counts, the round's metrics) -> next global model
Fuse = Callable[[int, ArrayRecord, list[ArrayRecord], list[float], MetricRecord], ArrayRecord]


class ClientModels(Delegating):
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
        valid = [r.content for r in replies if not r.has_error()]
        key = getattr(self.inner, "weighted_by_key", "num-examples")
        clients = [next(iter(c.array_records.values())) for c in valid]
        examples = [float(next(iter(c.metric_records.values()))[key]) for c in valid]
        metrics = MetricRecord() if metrics is None else metrics
        return self.fuse(server_round, averaged, clients, examples, metrics), metrics


def folder_images(root: Path) -> tuple[str, ...]:
    """Every image file under `root`, searched recursively, in a stable order."""
    return tuple(str(p) for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)


def unlabeled_images(cfg: Mapping) -> ImageSet:
    """The images the server distils on: D_align's (labels kept only as placeholders) or a folder's."""
    source = str(cfg["distill-data"])
    if source == DISTILL_ON_ALIGN:
        return align_set(cfg)
    files = folder_images(Path(source).expanduser())
    return ImageSet(np.zeros(len(files), dtype=np.int64), files=files)


def batches_of(cfg: Mapping, images: ImageSet) -> Batches:
    """`images` in `distill-batch-size` batches, normalised like the dataset, on the run's device."""
    return batches(cfg, images, int(cfg["distill-batch-size"]))


def check(cfg: Mapping, prepared: Prepared) -> None:
    """The preflight's check for FedDF and FedBE: the server holds unlabeled images to distil on (FedDF holds
    some of them out, so at least `MIN_IMAGES`)."""
    source = str(cfg["distill-data"])
    found = len(prepared.split.align) if source == DISTILL_ON_ALIGN else len(folder_images(Path(source).expanduser()))
    if found < MIN_IMAGES:
        where = "D_align" if source == DISTILL_ON_ALIGN else f"the folder {source!r}"
        raise ConfigError(
            f"run-config key 'distill-data' = {source!r}: {where} holds {found} image(s); strategy "
            f"{cfg['strategy']} distils the clients' ensemble on the server on at least {MIN_IMAGES} unlabeled "
            f"images ({', '.join(sorted(IMAGE_SUFFIXES))} files for a folder)."
        )


@torch.no_grad()
def logits_of(model: nn.Module, data: Batches, compute: Compute = CPU) -> torch.Tensor:
    """The model's float32 logits on every image of `data`, in order (eval mode)."""
    model.eval()
    with compute.autocast():
        return torch.cat([model(x).float() for x, _ in data.iterate()])


def ensemble_logits(
    cfg: Mapping, members: list[ArrayRecord], data: Batches, compute: Compute = CPU
) -> list[torch.Tensor]:
    """Each member model's logits on the unlabeled images, computed with one model object refilled per member."""
    model = model_from(cfg, members[0])
    return [logits_of(load_record(model, arrays), data, compute) for arrays in members]


def shuffled(data: Batches, targets: torch.Tensor, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """One pass over the images in a seeded random order, each batch with its target log-probabilities."""
    for idx, x, _ in data.iterate_indexed(shuffle=True, gen=gen):
        yield x, targets[idx]


class Distiller:
    """Optimiser steps on KL(target || student), targets given as log-probabilities, in the run's precision."""

    def __init__(self, student: nn.Module, opt: torch.optim.Optimizer, compute: Compute) -> None:
        self.student, self.opt, self.compute = student, opt, compute
        self.scaler = compute.scaler()

    def step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One step; returns the loss, left on the device (reading it would wait for the GPU every step)."""
        with self.compute.autocast():
            loss = kd_loss(self.student(x).float(), target, 1.0)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach()

"""FedDF (Lin et al., NeurIPS 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning"): FedAvg, then the server distils the ensemble of the round's client models into the average.

After averaging, the server starts from the averaged model and trains it on unlabeled server images
(`distill-data`) towards the softmax of the clients' averaged logits, with KL at temperature 1 and Adam at
`distill-lr` with cosine annealing over at most `feddf-steps` steps, as the paper. Like the paper, it holds
out 10 % of the images for early stopping: after every pass over the rest it measures the distillation
loss on them, stops once that has not improved for `feddf-patience` steps, and keeps the weights with the
lowest held-out loss (the averaged model itself when distillation never improved on it). Clients run plain
FedAvg and upload their weights only.

Departure from the paper: its held-out 10 % are labelled and the criterion is their accuracy. The server's
only labelled images are D_align, whose labels FedDF must not use, so the criterion is the held-out
distillation loss, which needs no labels.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from flcore.data import Batches
from flcore.device import CPU, Compute, compute_of
from flcore.experiment import model_from, to_record
from flcore.losses import kd_loss
from strategies.ensemble_distillation import (
    ClientModels,
    Distiller,
    batches_of,
    ensemble_logits,
    logits_of,
    shuffled,
    unlabeled_images,
)
from strategies.fedavg import sampling

HELD_OUT = 0.1  # FedDF's validation share of the data


def ensemble_targets(client_logits: list[torch.Tensor]) -> torch.Tensor:
    """FedDF's teacher: the log-softmax of the clients' averaged logits."""
    return F.log_softmax(torch.stack(client_logits).mean(0), dim=1)


def held_out_split(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the images to distil on and of the `HELD_OUT` share (at least one image) kept for stopping."""
    order = rng.permutation(count)
    held = max(1, round(HELD_OUT * count))
    return np.sort(order[held:]), np.sort(order[:held])


@torch.no_grad()
def held_out_loss(student: nn.Module, data: Batches, targets: torch.Tensor, compute: Compute = CPU) -> float:
    """The distillation loss on the held-out images (eval mode)."""
    return float(kd_loss(logits_of(student, data, compute), targets, 1.0))


def distill_until_plateau(
    student: nn.Module,
    train: tuple[Batches, torch.Tensor],
    held: tuple[Batches, torch.Tensor],
    max_steps: int,
    patience: int,
    lr: float,
    gen: torch.Generator,
    compute: Compute = CPU,
) -> tuple[int, float]:
    """Adam with cosine annealing on KL(targets || student) over `train` until `max_steps`, or until the loss on
    `held` has not improved for `patience` steps; leaves the student at its best held-out loss and returns
    the steps taken and that loss."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    distiller = Distiller(student, opt, compute)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps)
    best, best_step, best_state = held_out_loss(student, *held, compute), 0, copy.deepcopy(student.state_dict())
    step = 0
    while step < max_steps and step - best_step < patience:
        student.train()
        for x, target in shuffled(*train, gen):
            distiller.step(x, target)
            schedule.step()
            step += 1
            if step >= max_steps:
                break
        loss = held_out_loss(student, *held, compute)
        if loss < best:
            best, best_step, best_state = loss, step, copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    return step, best


class FedDFFusion:
    """The server half of FedDF: distil the round's client ensemble into the averaged model."""

    def __init__(self, cfg: Mapping) -> None:
        self.cfg = cfg

    def __call__(
        self, rnd: int, averaged: ArrayRecord, clients: list[ArrayRecord], examples: list[float], metrics: MetricRecord
    ) -> ArrayRecord:
        cfg, seed, compute = self.cfg, int(self.cfg["seed"]) + rnd, compute_of(self.cfg)
        images = unlabeled_images(cfg)
        train_idx, held_idx = held_out_split(len(images), np.random.default_rng(seed))
        train, held = batches_of(cfg, images.subset(train_idx)), batches_of(cfg, images.subset(held_idx))
        student = model_from(cfg, averaged)
        steps, loss = distill_until_plateau(
            student,
            (train, ensemble_targets(ensemble_logits(cfg, clients, train, compute))),
            (held, ensemble_targets(ensemble_logits(cfg, clients, held, compute))),
            int(cfg["feddf-steps"]),
            int(cfg["feddf-patience"]),
            float(cfg["distill-lr"]),
            torch.Generator().manual_seed(seed),
            compute,
        )
        metrics["distill-steps"], metrics["distill-held-out-loss"] = float(steps), loss
        metrics["ensemble-size"] = float(len(clients))
        return to_record(student)


def feddf(cfg: Mapping) -> Strategy:
    """FedAvg whose average is then fused with the round's client models by ensemble distillation."""
    return ClientModels(FedAvg(**sampling(cfg)), FedDFFusion(cfg), "FedDF")

"""FedDF (Lin et al., NeurIPS 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning"): FedAvg, then the server distils the ensemble of the round's client models into the average.

After averaging, the server starts from the averaged model and trains it on unlabeled server images
(`distill-data`) towards the softmax of the clients' averaged logits, with KL at temperature 1, Adam at
`distill-lr` with cosine annealing over at most `feddf-steps` steps, and stops early once the distillation
loss stops falling (`feddf-patience`). Clients run plain FedAvg and upload their weights only.

Departure from the paper: FedDF stops when the accuracy on a labelled validation set (10 % of the training
data) has not improved for 10^3 of its 10^4 steps. The server here holds no labelled data beyond D_align,
whose labels the method must not use, so the criterion is the distillation loss itself: the mean loss of
each pass over the unlabeled images, and distillation stops when no pass has set a new lowest mean for
`feddf-patience` steps (checked after every pass).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from flcore.data import Batches
from flcore.experiment import model_from, to_record
from strategies.ensemble_distillation import (
    ClientModels,
    distill_step,
    ensemble_logits,
    shuffled,
    unlabeled_batches,
)
from strategies.fedavg import sampling


def ensemble_targets(client_logits: list[torch.Tensor]) -> torch.Tensor:
    """FedDF's teacher: the log-softmax of the clients' averaged logits."""
    return F.log_softmax(torch.stack(client_logits).mean(0), dim=1)


def distill_until_plateau(
    student: nn.Module,
    batches: Batches,
    targets: torch.Tensor,
    max_steps: int,
    patience: int,
    lr: float,
    gen: torch.Generator,
) -> tuple[int, float]:
    """Adam with cosine annealing on KL(targets || student) until `max_steps`, or until no pass over the images
    has lowered the pass's mean loss for `patience` steps; returns the steps taken and the lowest pass mean."""
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps)
    step, best, best_step = 0, math.inf, 0
    while step < max_steps and step - best_step < patience:
        losses = []
        for x, target in shuffled(batches, targets, gen):
            losses.append(distill_step(student, opt, x, target))
            schedule.step()
            step += 1
            if step >= max_steps:
                break
        mean = statistics.fmean(losses)
        if mean < best:
            best, best_step = mean, step
    return step, best


class FedDFFusion:
    """The server half of FedDF: distil the round's client ensemble into the averaged model."""

    def __init__(self, cfg: Mapping) -> None:
        self.cfg = cfg

    def __call__(
        self, rnd: int, averaged: ArrayRecord, clients: list[ArrayRecord], examples: list[float], metrics: MetricRecord
    ) -> ArrayRecord:
        cfg = self.cfg
        batches = unlabeled_batches(cfg)
        targets = ensemble_targets(ensemble_logits(cfg, clients, batches))
        student = model_from(cfg, averaged)
        steps, loss = distill_until_plateau(
            student,
            batches,
            targets,
            int(cfg["feddf-steps"]),
            int(cfg["feddf-patience"]),
            float(cfg["distill-lr"]),
            torch.Generator().manual_seed(int(cfg["seed"]) + rnd),
        )
        metrics["distill-steps"], metrics["distill-loss"] = float(steps), loss
        metrics["ensemble-size"] = float(len(clients))
        return to_record(student)


def feddf(cfg: Mapping) -> Strategy:
    """FedAvg whose average is then fused with the round's client models by ensemble distillation."""
    return ClientModels(FedAvg(**sampling(cfg)), FedDFFusion(cfg), "FedDF")

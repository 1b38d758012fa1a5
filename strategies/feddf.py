"""FedDF (Lin et al., NeurIPS 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning"): FedAvg, then the server distils the ensemble of the round's client models into the average.

The server follows the authors' code (`epfml/federated-learning-public-code`,
`pcode/aggregation/noise_knowledge_transfer.py`, run with `update_student_scheme=avg_logits`): starting from
the averaged model, it trains on the unlabeled server images (`distill-data`, by default the training images
no client holds) towards the softmax of the clients' averaged logits, with KL at temperature 1, Adam at
`distill-lr` (1e-3) with cosine annealing over `feddf-steps` (10^4) steps of `distill-batch-size` (128)
images, and every gradient clipped to a total norm of 5. Every `feddf-eval-every` (100) steps it measures
the student's accuracy on a labelled validation set, stops once that has not risen for `feddf-patience`
(10^3) steps, and keeps the weights of the best measurement.

The validation set is D_align with its labels: the authors' is 10 % of the training split, labelled and held
by the server; here the server's labelled images are D_align, which no client holds either. Clients run
plain FedAvg and upload their weights only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from flcore.arrays import to_record
from flcore.batches import Batches
from flcore.config import Settings
from flcore.device import CPU, Compute, compute_of
from flcore.progress import progress
from flcore.run_model import model_from
from flcore.server_data import align_set
from strategies.ensemble_distillation import (
    ClientModels,
    Distiller,
    RoundModels,
    batches_of,
    ensemble_logits,
    logits_of,
    shuffled,
    unlabeled_images,
)
from strategies.fedavg import sampling

CLIP_NORM = 5.0  # FedDF's clip_grad_norm_ on the student's gradients, every step


@dataclass(frozen=True)
class Schedule:
    """How long FedDF distils: at most `steps` steps, measured every `eval_every`, stopped after `patience`
    steps without a higher validation accuracy."""

    steps: int
    eval_every: int
    patience: int


def ensemble_targets(client_logits: list[torch.Tensor]) -> torch.Tensor:
    """FedDF's teacher: the log-softmax of the clients' averaged logits."""
    return F.log_softmax(torch.stack(client_logits).mean(0), dim=1)


@torch.no_grad()
def accuracy(model: nn.Module, data: Batches, compute: Compute = CPU) -> float:
    """Top-1 accuracy in % on the labelled `data` (eval mode)."""
    predicted = logits_of(model, data, compute).argmax(1)
    return 100.0 * float((predicted == data.labels).float().mean())


def endless(data: Batches, targets: torch.Tensor, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches with their targets, pass after pass, each pass in a new seeded order (the authors' loader,
    restarted when exhausted)."""
    while True:
        yield from shuffled(data, targets, gen)


def distill_with_early_stopping(
    student: nn.Module,
    train: tuple[Batches, torch.Tensor],
    val: Batches,
    schedule: Schedule,
    lr: float,
    gen: torch.Generator,
    compute: Compute = CPU,
) -> tuple[int, float, int]:
    """FedDF's server loop: Adam with cosine annealing on KL(targets || student) over `train`, gradients clipped
    to `CLIP_NORM`; the accuracy on `val` is measured every `eval_every` steps and after the last one. Leaves
    the student at its best measurement (the first of equal ones) and returns the steps taken, that accuracy
    and its step. As in the authors' code the averaged model itself is not a candidate: the student kept is
    one that distilled for at least one measurement interval."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    distiller = Distiller(student, opt, compute, max_norm=CLIP_NORM)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.steps)
    best, best_step, best_state = -1.0, 0, student.state_dict()
    step = 0
    bar = progress(total=schedule.steps, desc="feddf distillation", unit="step")
    for x, target in endless(*train, gen):
        student.train()
        distiller.step(x, target)
        cosine.step()
        step += 1
        bar.update()
        if step % schedule.eval_every and step < schedule.steps:
            continue
        measured = accuracy(student, val, compute)
        if measured > best:
            best, best_step, best_state = measured, step, copy.deepcopy(student.state_dict())
        if step - best_step >= schedule.patience or step >= schedule.steps:
            break
    bar.close()
    student.load_state_dict(best_state)
    return step, best, best_step


class FedDFFusion:
    """The server half of FedDF: distil the round's client ensemble into the averaged model."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.data: tuple[Batches, Batches] | None = None  # the unlabeled and validation batches, made once

    def server_sets(self) -> tuple[Batches, Batches]:
        """The unlabeled images to distil on and D_align with its labels, on the device from the first round on."""
        if self.data is None:
            self.data = batches_of(self.cfg, unlabeled_images(self.cfg)), batches_of(self.cfg, align_set(self.cfg))
        return self.data

    def __call__(self, models: RoundModels, metrics: MetricRecord) -> ArrayRecord:
        cfg, seed, compute = self.cfg, self.cfg.seed + models.server_round, compute_of(self.cfg)
        unlabeled, val = self.server_sets()
        targets = ensemble_targets(ensemble_logits(cfg, models.clients, unlabeled, compute))
        student = model_from(cfg, models.averaged)
        schedule = Schedule(cfg.feddf_steps, cfg.feddf_eval_every, cfg.feddf_patience)
        gen = torch.Generator().manual_seed(seed)
        steps, best, best_step = distill_with_early_stopping(
            student, (unlabeled, targets), val, schedule, cfg.distill_lr, gen, compute
        )
        metrics["distill-steps"], metrics["distill-best-step"] = float(steps), float(best_step)
        metrics["distill-val-accuracy"], metrics["ensemble-size"] = best, float(len(models.clients))
        return to_record(student)


def feddf(cfg: Settings) -> Strategy:
    """FedAvg whose average is then fused with the round's client models by ensemble distillation."""
    return ClientModels(FedAvg(**sampling(cfg)), FedDFFusion(cfg), "FedDF")

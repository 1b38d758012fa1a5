"""FedBE (Chen and Chao, ICLR 2021, "FedBE: Making Bayesian Model Ensemble Applicable to Federated
Learning"): FedAvg, then a Bayesian model ensemble distilled into the average with SWA on the server.

After averaging, the server fits a Gaussian to the round's client weights, with mean sum_i p_i w_i and
diagonal variance sum_i p_i (w_i - mean)^2, p_i = n_i / sum_j n_j (the paper's global-model distribution),
and samples `fedbe-samples` models from it. The ensemble is the sampled models, the clients' models and the
averaged model; its averaged class probabilities on the unlabeled server images (`distill-data`) are the
pseudo-labels. Starting from the averaged model, the server trains on them with SGD (momentum 0.9, weight
decay 1e-5, `distill-lr`, as FedBE's code) for `fedbe-epochs` epochs while SWA averages the weights, then
recomputes the SWA model's BatchNorm statistics on the unlabeled images. Clients run plain FedAvg and
upload their weights only.

Departures, each for a reason:
- The authors' code fits its Gaussian to per-layer normalised client updates with a variance factor of
  0.1; this follows the paper's equation, a Gaussian over the weights themselves.
- Only the trainable parameters are sampled; a sampled model keeps the averaged model's BatchNorm
  running statistics (a sampled running variance could be negative).
- The authors' SWA collects the weights every 25 steps from step 500, about 30 % into their CIFAR-10 run;
  here it collects at the end of every epoch from 30 % of the epochs on (`SWA_START`), so that a small
  server set (D_align holds 10 images per class by default, one batch) still averages several models.
- The authors' KL is averaged over the classes as well as the batch, a step C times smaller at the same
  learning rate; here it is averaged over the batch (`kd_loss`), like FedDF's.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from flcore.data import Batches
from flcore.device import CPU, Compute, compute_of
from flcore.experiment import model_from, to_record
from strategies.ensemble_distillation import (
    ClientModels,
    Distiller,
    batches_of,
    ensemble_logits,
    shuffled,
    unlabeled_images,
)
from strategies.fedavg import sampling

SWA_START = 0.3  # fraction of the epochs after which SWA starts collecting
WEIGHT_DECAY = 1e-5  # FedBE's server optimiser


def gaussian(
    states: Sequence[Mapping[str, np.ndarray]], examples: Sequence[float], keys: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per weight, the sample-weighted mean and (diagonal) variance of the clients' values."""
    p = np.asarray(examples, np.float64) / float(sum(examples))
    mean = {k: sum(pi * s[k].astype(np.float64) for pi, s in zip(p, states, strict=True)) for k in keys}
    var = {k: sum(pi * (s[k].astype(np.float64) - mean[k]) ** 2 for pi, s in zip(p, states, strict=True)) for k in keys}
    return mean, var


def sample_models(
    averaged: ArrayRecord,
    mean: Mapping[str, np.ndarray],
    var: Mapping[str, np.ndarray],
    count: int,
    rng: np.random.Generator,
) -> list[ArrayRecord]:
    """`count` models whose weights in `mean` are drawn from N(mean, var); every other array is `averaged`'s."""
    models = []
    for _ in range(count):
        drawn = {
            k: Array(np.asarray(mean[k] + np.sqrt(var[k]) * rng.standard_normal(mean[k].shape)).astype(a.dtype))
            if k in mean
            else a
            for k, a in averaged.items()
        }
        models.append(ArrayRecord(drawn))
    return models


def pseudo_labels(member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """FedBE's pseudo-labels: the ensemble's averaged class probabilities, as log-probabilities."""
    probs = torch.stack([torch.softmax(logits, dim=1) for logits in member_logits]).mean(0)
    return probs.clamp_min(1e-12).log()


def distill_with_swa(
    student: nn.Module,
    data: Batches,
    targets: torch.Tensor,
    epochs: int,
    lr: float,
    gen: torch.Generator,
    compute: Compute = CPU,
) -> tuple[nn.Module, float]:
    """SGD on KL(targets || student) for `epochs` epochs, SWA over the epochs from `SWA_START` on, then the SWA
    model's BatchNorm statistics recomputed on the images; returns it and the last epoch's mean loss."""
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    distiller = Distiller(student, opt, compute)
    swa = AveragedModel(student)
    first = min(int(SWA_START * epochs), epochs - 1)
    losses = [torch.zeros(())]
    for epoch in range(epochs):
        losses = [distiller.step(x, target) for x, target in shuffled(data, targets, gen)]
        if epoch >= first:
            swa.update_parameters(student)
    update_bn(data.iterate(), swa.module)
    return swa.module, statistics.fmean(float(loss) for loss in losses)


class FedBEFusion:
    """The server half of FedBE: Gaussian over the client weights, ensemble pseudo-labels, SWA distillation."""

    def __init__(self, cfg: Mapping) -> None:
        self.cfg = cfg

    def __call__(
        self, rnd: int, averaged: ArrayRecord, clients: list[ArrayRecord], examples: list[float], metrics: MetricRecord
    ) -> ArrayRecord:
        cfg, seed, compute = self.cfg, int(self.cfg["seed"]) + rnd, compute_of(self.cfg)
        student = model_from(cfg, averaged)
        weights = [name for name, _ in student.named_parameters()]
        mean, var = gaussian([{k: a.numpy() for k, a in c.items()} for c in clients], examples, weights)
        sampled = sample_models(averaged, mean, var, int(cfg["fedbe-samples"]), np.random.default_rng(seed))
        members = [averaged, *clients, *sampled]
        data = batches_of(cfg, unlabeled_images(cfg))
        targets = pseudo_labels(ensemble_logits(cfg, members, data, compute))
        gen = torch.Generator().manual_seed(seed)
        fused, loss = distill_with_swa(
            student, data, targets, int(cfg["fedbe-epochs"]), float(cfg["distill-lr"]), gen, compute
        )
        metrics["distill-loss"], metrics["ensemble-size"] = loss, float(len(members))
        return to_record(fused)


def fedbe(cfg: Mapping) -> Strategy:
    """FedAvg whose average is then replaced by the SWA student of FedBE's Bayesian model ensemble."""
    return ClientModels(FedAvg(**sampling(cfg)), FedBEFusion(cfg), "FedBE")

"""FedBE (Chen and Chao, ICLR 2021, "FedBE: Making Bayesian Model Ensemble Applicable to Federated
Learning"): FedAvg, then a Bayesian model ensemble distilled into the average with SWA on the server.

After averaging, the server fits a diagonal Gaussian to the round's client updates as FedBE's code does
(`hongyouc/FedBE`, `swag.py`, `SWAG_server` in its `gaussian` mode): per layer, each client's update from
the model the server sent is divided by its norm; the Gaussian's mean is the clients' mean normalised update
and its variance their variance (at least 1e-5), the standard deviation times `fedbe-var-scale` (0.1); a
drawn update is scaled back by the clients' mean update norm and added to the sent model. The server samples
`fedbe-samples` models from it. The ensemble is the sampled models, the clients' models and the
averaged model; its averaged class probabilities on the unlabeled server images (`distill-data`) are the
pseudo-labels. Starting from the averaged model, the server trains on them with SGD (momentum 0.9, weight
decay 1e-5, `distill-lr`, as FedBE's code) for `fedbe-epochs` epochs while SWA averages the weights, then
recomputes the SWA model's BatchNorm statistics on the unlabeled images. Clients run plain FedAvg and
upload their weights only.

Departures, each for a reason:
- Only the trainable parameters are sampled (the authors' code samples BatchNorm's running statistics too);
  a sampled model keeps the averaged model's running statistics (a sampled running variance could be
  negative).
- The authors' SWA collects the weights every 25 steps from step 500, about 30 % into their CIFAR-10 run;
  here it collects at the end of every epoch from 30 % of the epochs on (`SWA_START`), so that a small
  server set (`distill-data=align`: D_align, one batch at the defaults) still averages several models.
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

from flcore.arrays import to_record
from flcore.batches import Batches
from flcore.config import Settings
from flcore.device import CPU, Compute, compute_of
from flcore.progress import progress
from flcore.run_model import model_from
from strategies.ensemble_distillation import (
    ClientModels,
    Distiller,
    RoundModels,
    batches_of,
    ensemble_logits,
    shuffled,
    unlabeled_images,
)
from strategies.fedavg import sampling

SWA_START = 0.3  # fraction of the epochs after which SWA starts collecting
WEIGHT_DECAY = 1e-5  # FedBE's server optimiser
MIN_VARIANCE = 1e-5  # FedBE's var_clamp on the variance of the normalised updates


def layer_gaussian(start: np.ndarray, clients: Sequence[np.ndarray], var_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of one layer's weights under FedBE's Gaussian over normalised updates.

    u_i = (w_i - start) / ||w_i - start|| (0 for a client that left the layer unchanged, where the authors'
    code divides by zero); the drawn weights are start + mean_i ||w_i - start|| * (mu + var_scale * sigma * eps)
    with mu, sigma^2 the mean and variance (at least `MIN_VARIANCE`) of the u_i and eps ~ N(0, 1).
    """
    updates = [np.asarray(c, np.float64) - start for c in clients]
    norms = [float(np.linalg.norm(u)) for u in updates]
    unit = np.stack([u / n if n > 0 else np.zeros_like(u) for u, n in zip(updates, norms, strict=True)])
    mu, var = unit.mean(0), np.maximum((unit**2).mean(0) - unit.mean(0) ** 2, MIN_VARIANCE)
    scale = float(np.mean(norms))
    return start + scale * mu, scale * var_scale * np.sqrt(var)


def update_gaussian(
    start: Mapping[str, np.ndarray], clients: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str], var_scale: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per weight in `keys`, the mean and standard deviation of FedBE's Gaussian (`layer_gaussian`)."""
    layers = {k: layer_gaussian(np.asarray(start[k], np.float64), [c[k] for c in clients], var_scale) for k in keys}
    return {k: m for k, (m, _) in layers.items()}, {k: s for k, (_, s) in layers.items()}


def sample_models(
    averaged: ArrayRecord,
    mean: Mapping[str, np.ndarray],
    std: Mapping[str, np.ndarray],
    count: int,
    rng: np.random.Generator,
) -> list[ArrayRecord]:
    """`count` models whose weights in `mean` are drawn from N(mean, std^2); every other array is `averaged`'s."""
    models = []
    for _ in range(count):
        drawn = {
            k: Array(np.asarray(mean[k] + std[k] * rng.standard_normal(mean[k].shape)).astype(a.dtype))
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
    for epoch in progress(range(epochs), desc="fedbe distillation", unit="epoch"):
        losses = [distiller.step(x, target) for x, target in shuffled(data, targets, gen)]
        if epoch >= first:
            swa.update_parameters(student)
    update_bn(data.iterate(), swa.module)
    return swa.module, statistics.fmean(float(loss) for loss in losses)


class FedBEFusion:
    """The server half of FedBE: Gaussian over the client updates, ensemble pseudo-labels, SWA distillation."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.data: Batches | None = None  # the unlabeled images' batches, made once

    def __call__(self, models: RoundModels, metrics: MetricRecord) -> ArrayRecord:
        cfg, seed, compute = self.cfg, self.cfg.seed + models.server_round, compute_of(self.cfg)
        averaged, clients = models.averaged, models.clients
        student = model_from(cfg, averaged)
        weights = [name for name, _ in student.named_parameters()]
        start = {k: a.numpy() for k, a in models.start.items()}
        mean, std = update_gaussian(
            start, [{k: a.numpy() for k, a in c.items()} for c in clients], weights, cfg.fedbe_var_scale
        )
        sampled = sample_models(averaged, mean, std, cfg.fedbe_samples, np.random.default_rng(seed))
        members = [averaged, *clients, *sampled]
        if self.data is None:
            self.data = batches_of(cfg, unlabeled_images(cfg))
        data = self.data
        targets = pseudo_labels(ensemble_logits(cfg, members, data, compute))
        gen = torch.Generator().manual_seed(seed)
        fused, loss = distill_with_swa(student, data, targets, cfg.fedbe_epochs, cfg.distill_lr, gen, compute)
        metrics["distill-loss"], metrics["ensemble-size"] = loss, float(len(members))
        return to_record(fused)


def fedbe(cfg: Settings) -> Strategy:
    """FedAvg whose average is then replaced by the SWA student of FedBE's Bayesian model ensemble."""
    return ClientModels(FedAvg(**sampling(cfg)), FedBEFusion(cfg), "FedBE")

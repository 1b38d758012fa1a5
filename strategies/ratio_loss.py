"""Ratio Loss (Wang et al., AAAI 2021, "Addressing Class Imbalance in Federated Learning"), around FedAvg.

The server holds a small class-balanced auxiliary set, D_align. Every round, before sending the global
model, it trains a copy of that model on the D_align images of each class q alone, as a client trains (the
round's local epochs, learning rate, momentum and weight decay, the run's batch size, plain cross-entropy;
no augmentation), and keeps the change U_q of the classifier's weights ([C, D], no bias). From the C
updates, as the authors' code does (`models/Fed.py` of balanced-fl/Addressing-Class-Imbalance-FL):

- each classifier weight belongs to the class whose update of it is the largest, unless another class's
  update reaches 80 % of that one in magnitude (then to none): `owners`;
- Ra_p = |sum of U_p over class p's weights| / |sum over them of the mean of the other classes' updates|
  compares how far class p's own images move the weights it dominates with how far the other classes'
  images move them on average. The others push a class's weights by about the probability the model gives
  it on their images, so a class the global model neglects (a minority class) gets a large Ra_p. Where the
  others' updates sum to zero (a class that dominates no weight) Ra_p is 10, the authors' value.
- the class weights `ratio-alpha` + `ratio-beta` * min(Ra_p, 5000) go to the clients in the round config,
  and each client trains with the Ratio Loss -w_y log p_y (`flcore.losses.ratio_loss`).
- the monitor (the paper's estimate of the round's class composition): after aggregation, the change of
  the classifier's weights is, to first order, proportional to sum_q n_q U_q, so a least-squares fit of the
  change on the C class updates gives the n_q up to scale; normalised, it is reported as
  `ratio-composition` in metrics.jsonl.

Departures: the authors' monitor solves for n_p weight by weight, assuming the other classes push alike and
knowing the clients' batch size; the joint least-squares fit needs neither. The weights of round t come
from the model sent in round t; the authors' come from the previous round's model, with plain cross-entropy
in round 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from logging import INFO

import numpy as np
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from flcore.batches import Batches
from flcore.class_statistics import npy_bytes
from flcore.config import ConfigError, Settings
from flcore.device import CPU, Compute, compute_of
from flcore.losses import LOSS_KEY, RATIO_WEIGHTS_KEY
from flcore.run_data import Prepared, batches, prepare
from flcore.run_model import model_from
from flcore.seeding import seeded_generator
from flcore.server_data import align_set
from flcore.training import TrainSettings, train
from rounds.delegate import Delegating
from strategies.class_uploads import WEIGHT
from strategies.fedavg import sampling

RATIO_CAP = 5000.0  # the authors' upper bound on Ra_p
DEGENERATE_RATIO = 10.0  # the authors' Ra_p where the other classes' updates of class p's weights sum to 0
DOMINANCE = 0.8  # another class's update above 80 % of the largest one (in magnitude) leaves the weight ownerless


def auxiliary_settings(cfg: Settings, round_config: Mapping) -> TrainSettings:
    """How the server trains on one class's auxiliary images: as the round's clients do, without
    augmentation (the authors run their clients' `LocalUpdate` on it)."""
    return replace(TrainSettings.for_round(cfg, round_config), augment=False, proximal_mu=0.0)


def class_updates(
    model: nn.Module, per_class: Sequence[Batches], settings: TrainSettings, gen, compute: Compute = CPU
) -> np.ndarray:
    """U [C, C, D] (float32, as the model): U[q] is the change of the classifier's weights when the model
    trains on class q's auxiliary images alone; the model is left as it came."""
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = sent[WEIGHT].cpu().numpy()
    updates = []
    for class_batches in per_class:
        model.load_state_dict(sent)
        train(model, class_batches, settings, gen, F.cross_entropy, compute=compute)
        updates.append(model.state_dict()[WEIGHT].detach().cpu().numpy() - start)
    model.load_state_dict(sent)
    model.zero_grad(set_to_none=True)
    return np.stack(updates)


def owners(updates: np.ndarray) -> np.ndarray:
    """[C, D]: the class each classifier weight belongs to, -1 for none. A weight belongs to the class whose
    update of it is the largest (the first of a tie) when no other class's update exceeds `DOMINANCE` of
    that one in magnitude; when the largest update is 0, when no other update is 0 as well."""
    top = updates.argmax(axis=0)
    peak = np.take_along_axis(updates, top[None], axis=0)[0].astype(np.float64)
    magnitude = np.abs(peak)
    safe = np.where(magnitude > 0, magnitude, 1.0)
    close = np.zeros(peak.shape, np.int64)  # updates as large as the peak's share, the peak's own included
    for update in updates.astype(np.float64):
        close += np.where(magnitude > 0, np.abs(update) / safe > DOMINANCE, update == 0)
    return np.where(close < 2, top, -1)


def ratio_estimates(updates: np.ndarray) -> np.ndarray:
    """Ra_p for every class p: |sum of U_p over p's weights| / |sum over them of mean_{q != p} U_q|, or
    `DEGENERATE_RATIO` where that denominator is 0."""
    num_classes = updates.shape[0]
    owner = owners(updates)
    peak = updates.max(axis=0).astype(np.float64)  # the owner's own update, where a weight has one
    others = (updates.sum(axis=0, dtype=np.float64) - peak) / max(num_classes - 1, 1)
    held = owner >= 0
    own = np.bincount(owner[held], weights=peak[held], minlength=num_classes)
    push = np.bincount(owner[held], weights=others[held], minlength=num_classes)
    return np.where(push != 0, np.abs(own) / np.where(push != 0, np.abs(push), 1.0), DEGENERATE_RATIO)


def class_weights(updates: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The Ratio Loss's per-class weights alpha + beta * min(Ra_p, cap)."""
    return alpha + beta * np.minimum(ratio_estimates(updates), RATIO_CAP)


def composition(updates: np.ndarray, change: np.ndarray) -> np.ndarray:
    """The monitor: shares n_q / sum n of the round's training images per class, from the classifier change.

    Least squares of change ~= sum_q c_q U_q; the clients' images of class q move the classifier as the
    server's did, so n_q is proportional to c_q (negative fits, noise, are clipped to 0). Uniform when
    nothing could be fitted.
    """
    num_classes = updates.shape[0]
    basis = updates.reshape(num_classes, -1).T.astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, np.asarray(change, np.float64).ravel(), rcond=None)
    share = np.maximum(coef, 0.0)
    total = share.sum()
    return share / total if total > 0 else np.full(num_classes, 1.0 / num_classes)


class RatioLoss(Delegating):
    """Any strategy whose clients train with the Ratio Loss, with class weights and a composition estimate
    from the server's per-class updates on D_align."""

    def __init__(self, inner: Strategy, cfg: Settings) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.monitor: dict[str, np.ndarray] = {}  # this round's class updates, classifier sent and class weights
        self._per_class: list[Batches] = []

    def summary(self) -> None:
        log(INFO, "\t├──> Ratio Loss: class weights from per-class updates on D_align, sent every round")
        self.inner.summary()

    def _auxiliary(self) -> list[Batches]:
        """D_align split by class, in the clients' batch size, on the run's device (built once)."""
        if not self._per_class:
            aux, size = align_set(self.cfg), self.cfg.batch_size
            num_classes = prepare(self.cfg).dataset.num_classes
            self._per_class = [
                batches(self.cfg, aux.subset(np.flatnonzero(aux.labels == q)), size) for q in range(num_classes)
            ]
        return self._per_class

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cfg = self.cfg
        settings = auxiliary_settings(cfg, config)
        gen = seeded_generator(cfg.seed, server_round)
        updates = class_updates(model_from(cfg, arrays), self._auxiliary(), settings, gen, compute_of(cfg))
        weights = class_weights(updates, cfg.ratio_alpha, cfg.ratio_beta)
        self.monitor = {"updates": updates, "classifier": arrays[WEIGHT].numpy(), "weights": weights}
        entries = {LOSS_KEY: "ratio", RATIO_WEIGHTS_KEY: npy_bytes(weights.astype(np.float32))}
        return self.inner.configure_train(server_round, arrays, ConfigRecord({**config, **entries}), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or not self.monitor:
            return arrays, metrics
        metrics = MetricRecord() if metrics is None else metrics
        change = arrays[WEIGHT].numpy().astype(np.float64) - self.monitor["classifier"]
        metrics["ratio-composition"] = composition(self.monitor["updates"], change).tolist()
        metrics["ratio-weights"] = self.monitor["weights"].tolist()
        return arrays, metrics


def ratioloss(cfg: Settings) -> Strategy:
    """FedAvg whose clients train with the Ratio Loss and whose class composition the server monitors."""
    return RatioLoss(FedAvg(**sampling(cfg)), cfg)


def check(cfg: Settings, prepared: Prepared) -> None:
    """The preflight's Ratio Loss check: the server's auxiliary set D_align holds every class."""
    labels = prepared.align_source.labels[prepared.split.align]
    counts = np.bincount(labels, minlength=prepared.dataset.num_classes)
    missing = [prepared.dataset.classes[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise ConfigError(
            f"strategy 'ratioloss' needs D_align (the server's balanced auxiliary set) to hold every class; it "
            f"has no images of {missing[:5]}: raise align-per-class or check align-data."
        )

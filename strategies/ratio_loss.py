"""Ratio Loss (Wang et al., AAAI 2021, "Addressing Class Imbalance in Federated Learning"), around FedAvg.

The server holds a small class-balanced auxiliary set, D_align. Every round, before sending the global
model, it computes on D_align, under that model, the gradient G_q of the cross-entropy with respect to the
classifier ([C, D+1]: weights and bias) for each class q separately. From them:

- the Ratio Loss's class weights (the authors' code): for class p, Ra_p = ||G_p[p]|| / ||mean_{q != p} G_q[p]||
  compares how hard class p's own images pull on its output neuron with how hard the other classes' push
  on it; a class the global model neglects (a minority class) pulls harder, so Ra_p is large. The weights
  `ratio-alpha` + `ratio-beta` * Ra_p (Ra_p capped at 5000, as the authors' code) go to the clients in the
  round config, and each client trains with the Ratio Loss -w_y log p_y (`flcore.losses.ratio_loss`).
- the monitor (the paper's estimate of the round's class composition): after aggregation, the change of
  the classifier is, to first order, -lr_eff * sum_q n_q G_q, so a least-squares fit of the change on the C
  class gradients gives the n_q up to scale; normalised, it is reported as `ratio-composition` in
  metrics.jsonl.

Departures: the authors compare one-step SGD updates of the whole model on each class's auxiliary data,
restricted to the classifier weights where one class's update dominates (an 80 % threshold); the exact
gradient of the classifier is what a one-step update of it is proportional to, and the norm of neuron p's
gradient row replaces the sum over dominated weights, which needs no threshold. Their monitor solves for
n_p weight by weight, assuming the other classes push alike and knowing the clients' batch sizes; the
joint least-squares fit needs neither. The weights of round t come from the model sent in round t; the
authors' come from the previous round's model, with plain cross-entropy in round 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.class_statistics import class_gradients, npy_bytes
from flcore.config import ConfigError
from flcore.data import Batches
from flcore.experiment import Prepared, align_set, batches, model_from, prepare
from flcore.losses import LOSS_KEY, RATIO_WEIGHTS_KEY
from rounds.delegate import Delegating
from strategies.calibration import BIAS, WEIGHT
from strategies.fedavg import sampling

RATIO_CAP = 5000.0  # the authors' upper bound on Ra_p


def classifier_matrix(arrays: ArrayRecord) -> np.ndarray:
    """The classifier as one [C, D+1] matrix: weights, then the bias as the last column."""
    return np.concatenate([arrays[WEIGHT].numpy(), arrays[BIAS].numpy()[:, None]], axis=1).astype(np.float64)


def auxiliary_gradients(model, batches: Batches, num_classes: int) -> np.ndarray:
    """G [C, C, D+1]: G[q] is the mean-CE gradient of the classifier on the auxiliary images of class q."""
    grads = class_gradients(model, batches, num_classes)
    return np.concatenate([grads["grad-weight"], grads["grad-bias"][..., None]], axis=2).astype(np.float64)


def ratio_estimates(grads: np.ndarray) -> np.ndarray:
    """Ra_p = ||G_p[p]|| / ||mean_{q != p} G_q[p]|| for every class p (0 where class p pulls nothing)."""
    num_classes = grads.shape[0]
    own = grads[np.arange(num_classes), np.arange(num_classes)]  # row p of class p's gradient
    others = (grads.sum(axis=0) - own) / max(num_classes - 1, 1)  # row p, averaged over the other classes
    pull, push = np.linalg.norm(own, axis=1), np.linalg.norm(others, axis=1)
    return np.where(push > 0, pull / np.where(push > 0, push, 1.0), np.where(pull > 0, RATIO_CAP, 0.0))


def class_weights(grads: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The Ratio Loss's per-class weights alpha + beta * min(Ra_p, cap)."""
    return alpha + beta * np.minimum(ratio_estimates(grads), RATIO_CAP)


def composition(grads: np.ndarray, change: np.ndarray) -> np.ndarray:
    """The monitor: shares n_q / sum n of the round's training images per class, from the classifier change.

    Least squares of change ~= sum_q c_q G_q; SGD moves against the gradient, so n_q is proportional to
    -c_q (negative fits, noise, are clipped to 0). Uniform when nothing could be fitted.
    """
    num_classes = grads.shape[0]
    coef, *_ = np.linalg.lstsq(grads.reshape(num_classes, -1).T, change.ravel(), rcond=None)
    share = np.maximum(-coef, 0.0)
    total = share.sum()
    return share / total if total > 0 else np.full(num_classes, 1.0 / num_classes)


class RatioLoss(Delegating):
    """Any strategy whose clients train with the Ratio Loss, with class weights and a composition estimate
    from the server's auxiliary gradients."""

    def __init__(self, inner: Strategy, cfg: Mapping) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.monitor: dict[str, np.ndarray] = {}  # this round's gradients, classifier sent and class weights

    def summary(self) -> None:
        log(INFO, "\t├──> Ratio Loss: class weights from D_align's classifier gradients, sent every round")
        self.inner.summary()

    def _auxiliary(self) -> Batches:
        """D_align in evaluation batches, on the run's device."""
        return batches(self.cfg, align_set(self.cfg), int(self.cfg["eval-batch-size"]))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cfg = self.cfg
        num_classes = prepare(cfg).dataset.num_classes
        grads = auxiliary_gradients(model_from(cfg, arrays), self._auxiliary(), num_classes)
        weights = class_weights(grads, float(cfg["ratio-alpha"]), float(cfg["ratio-beta"]))
        self.monitor = {"grads": grads, "classifier": classifier_matrix(arrays), "weights": weights}
        entries = {LOSS_KEY: "ratio", RATIO_WEIGHTS_KEY: npy_bytes(weights.astype(np.float32))}
        return self.inner.configure_train(server_round, arrays, ConfigRecord({**config, **entries}), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or not self.monitor:
            return arrays, metrics
        metrics = MetricRecord() if metrics is None else metrics
        change = classifier_matrix(arrays) - self.monitor["classifier"]
        metrics["ratio-composition"] = composition(self.monitor["grads"], change).tolist()
        metrics["ratio-weights"] = self.monitor["weights"].tolist()
        return arrays, metrics


def ratioloss(cfg: Mapping) -> Strategy:
    """FedAvg whose clients train with the Ratio Loss and whose class composition the server monitors."""
    return RatioLoss(FedAvg(**sampling(cfg)), cfg)


def check(cfg: Mapping, prepared: Prepared) -> None:
    """The preflight's Ratio Loss check: the server's auxiliary set D_align holds every class."""
    labels = prepared.align_source.labels[prepared.split.align]
    counts = np.bincount(labels, minlength=prepared.dataset.num_classes)
    missing = [prepared.dataset.classes[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise ConfigError(
            f"strategy 'ratioloss' needs D_align (the server's balanced auxiliary set) to hold every class; it "
            f"has no images of {missing[:5]}: raise align-per-class or check align-data."
        )

"""FedAvgM (Hsu et al., 2019, arXiv 1909.06335): server SGD with momentum on the averaged update.

Why not Flower's `FedAvgM`: Flower 1.42 applies the server step to every array of the state dict,
BatchNorm's running statistics included. A running variance is a statistic of the clients' features, not a
trained parameter: momentum carries it past every client's value, and with `server-momentum` 0.97 and
`server-lr` 0.03 on digits-LT the variances fell below zero by round 14-16, so the logits became NaN
(and argmax of an all-NaN row "predicted" class 0, 9.83 % in every cell). Here the step acts on the
trained parameters only; the buffers (running mean, variance, batch count) take FedAvg's weighted mean,
as in FedNova (`strategies.fednova`), and which entries are buffers is asked of the model
(`flcore.models.buffer_names`).

The step follows `torch.optim.SGD` (dampening 0, no weight decay), as FL-bench's `src/server/fedavgm.py`
does with `lr=1.0, momentum=0.9, nesterov=True`, the defaults here:

    g = w - sum_i p_i w_i             (pseudo-gradient, p_i = n_i / sum_j n_j)
    m = g in the first step, else beta * m + g
    w <- w - lr * (g + beta * m)      (Nesterov; plain momentum: w <- w - lr * m)

The step starts from the model `configure_train` sent, which is the last server stage's output, so a
stage's change is never undone. The momentum is the state that must survive a restart:
`state_dict`/`load_state_dict` hand it to the checkpoint (`rounds.checkpoint`), every entry as an array.
Sampling, reply checks, the weighted mean and metric aggregation are delegated to a held `FedAvg`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.config import Settings
from flcore.models import run_buffer_names
from rounds.delegate import FromSentModel
from strategies.fedavg import sampling

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ServerSGD:
    """The server optimiser's settings: learning rate, momentum beta, Nesterov or plain momentum."""

    lr: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True


def in_dtype_of(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`value` in `like`'s dtype: integer buffers (BatchNorm's batch count) come back from the mean as floats."""
    if np.issubdtype(like.dtype, np.integer):
        value = np.rint(value)
    return np.asarray(value, dtype=like.dtype)


def server_step(
    current: Arrays,
    averaged: Arrays,
    momentum: Arrays,
    sgd: ServerSGD,
    buffers: Collection[str] = (),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One FedAvgM step from the global model `current` and the clients' weighted mean `averaged`.

    Returns the new global model and the new momentum (empty `momentum`: the first step). Entries named in
    `buffers` are set to their mean and get no momentum.
    """
    new, moved = {}, {}
    for key, w in current.items():
        mean = averaged[key]
        if key in buffers:
            new[key] = in_dtype_of(mean, w)
            continue
        g = w - mean.astype(w.dtype)
        m = g if key not in momentum else sgd.momentum * momentum[key] + g
        step = g + sgd.momentum * m if sgd.nesterov else m
        new[key], moved[key] = in_dtype_of(w - sgd.lr * step, w), in_dtype_of(m, w)
    return new, moved


class FedAvgM(FromSentModel):
    """Server momentum over the trained parameters, around a `FedAvg` that samples and averages."""

    def __init__(self, base: FedAvg, sgd: ServerSGD, buffers: Collection[str] = ()) -> None:
        super().__init__(base)
        self.sgd, self.buffers = sgd, frozenset(buffers)
        self.momentum: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        kind = "Nesterov" if self.sgd.nesterov else "plain"
        log(INFO, "\t├──> FedAvgM: server lr %s, %s momentum %s", self.sgd.lr, kind, self.sgd.momentum)
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged, metrics = self.inner.aggregate_train(server_round, replies)
        if averaged is None:
            return None, metrics
        new, self.momentum = server_step(
            _numpy(self.sent_model()), _numpy(averaged), self.momentum, self.sgd, self.buffers
        )
        return ArrayRecord({key: torch.from_numpy(value) for key, value in new.items()}), metrics

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The momentum, for the checkpoint; 0-d entries stay 0-d tensors."""
        return {"momentum": {key: torch.from_numpy(np.array(value)) for key, value in self.momentum.items()}}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.momentum = {key: value.numpy().copy() for key, value in state["momentum"].items()}


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


def fedavgm(cfg: Settings) -> Strategy:
    """FedAvgM with the configured server optimiser; the configured model's buffers averaged plainly."""
    sgd = ServerSGD(cfg.server_lr, cfg.server_momentum, cfg.server_nesterov)
    return FedAvgM(FedAvg(**sampling(cfg)), sgd, run_buffer_names(cfg))

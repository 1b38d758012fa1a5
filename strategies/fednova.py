"""FedNova (Wang et al., NeurIPS 2020) for Flower's Message API, which ships no FedNova.

Clients that run more local SGD steps move further from the global model; plain FedAvg then drifts
towards the objective of the busiest clients. FedNova normalises each client's update by its own
number of local steps tau_i (clients already report `local-steps`) and rescales the average by the
effective step count (plain local SGD, no momentum):

    d_i = (w_global - w_i) / tau_i,   tau_eff = sum_i p_i tau_i,   w_new = w_global - tau_eff * sum_i p_i d_i

with p_i = n_i / sum_j n_j. With equal tau_i this is exactly FedAvg. The normalisation applies to what
SGD updates only: the model's buffers (BatchNorm's running mean and variance and batch count) are
statistics, not tau_i gradient steps, so they are averaged plainly, weighted by examples as in FedAvg
(normalising them would push e.g. a running variance past every client's value). Which entries are
buffers is asked of the model itself (`flcore.models.buffer_names`). Sampling, messages, reply checks
and metric aggregation are delegated to a held `FedAvg` (composition, not subclassing).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.arrays import reply_arrays, reply_metrics
from flcore.config import Settings
from flcore.models import run_buffer_names
from rounds.delegate import FromSentModel
from strategies.fedavg import sampling

STEPS_KEY = "local-steps"


def normalized_average(
    global_arrays: ArrayRecord,
    client_arrays: list[ArrayRecord],
    examples: list[float],
    steps: list[float],
    buffers: Collection[str] = (),
) -> tuple[ArrayRecord, float]:
    """FedNova's update of `global_arrays` from the clients' weights, sample counts and local steps;
    entries named in `buffers` get FedAvg's weighted mean instead."""
    if any(t <= 0 for t in steps):
        raise ValueError(f"FedNova needs every client's '{STEPS_KEY}' > 0, got {steps}")
    total = float(sum(examples))
    p = [n / total for n in examples]
    tau_eff = sum(pi * ti for pi, ti in zip(p, steps, strict=True))
    out = {}
    for key, g_arr in global_arrays.items():
        g = g_arr.numpy()
        if key in buffers:
            new = sum(pi * arrays[key].numpy().astype(np.float64) for pi, arrays in zip(p, client_arrays, strict=True))
        else:
            direction = sum(
                (pi / ti) * (g.astype(np.float64) - arrays[key].numpy())
                for pi, ti, arrays in zip(p, steps, client_arrays, strict=True)
            )
            new = g - tau_eff * direction
        out[key] = Array(np.asarray(new.astype(g.dtype) if np.issubdtype(g.dtype, np.floating) else new))
    return ArrayRecord(out), tau_eff


class FedNova(FromSentModel):
    """Normalised averaging around a `FedAvg` that samples clients and aggregates their metrics."""

    def __init__(self, base: FedAvg, buffers: Collection[str] = ()) -> None:
        super().__init__(base)
        self.buffers = frozenset(buffers)

    def summary(self) -> None:
        log(INFO, "\t├──> FedNova: updates normalised by each client's '%s'", STEPS_KEY)
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        averaged, metrics = self.inner.aggregate_train(server_round, replies)  # checks replies, averages metrics
        if averaged is None:
            return None, metrics
        valid = [r.content for r in replies if not r.has_error()]
        key = self.inner.weighted_by_key
        records = [reply_metrics(c) for c in valid]
        if any(STEPS_KEY not in m for m in records):
            raise KeyError(f"FedNova needs '{STEPS_KEY}' in every client's train metrics")
        arrays, tau_eff = normalized_average(
            self.sent_model(),
            [reply_arrays(c) for c in valid],
            [float(m[key]) for m in records],
            [float(m[STEPS_KEY]) for m in records],
            self.buffers,
        )
        metrics = MetricRecord() if metrics is None else metrics
        metrics["fednova-tau-eff"] = tau_eff
        return arrays, metrics


def fednova(cfg: Settings) -> Strategy:
    """FedNova around a FedAvg that samples like every other strategy; the configured model's buffers averaged."""
    return FedNova(FedAvg(**sampling(cfg)), run_buffer_names(cfg))

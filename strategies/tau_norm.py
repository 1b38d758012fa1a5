"""tau-norm (Kang et al., ICLR 2020, "Decoupling representation and classifier"), post hoc on the server.

A long-tailed training set leaves head classes with larger classifier weight norms, which biases
predictions towards them. Rescaling each class's weight vector, w_c / ||w_c||^tau, evens the norms out
(tau = 1 makes them all unit length, tau = 0 changes nothing). It needs no data and nothing from the
clients, and acts on the final global model only.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from flcore.config import Settings
from rounds.stage import Outcome, ServerContext, Stages

CLASSIFIER_WEIGHT = "classifier.weight"


def tau_normalize(arrays: ArrayRecord, tau: float, key: str = CLASSIFIER_WEIGHT) -> ArrayRecord:
    """A copy of `arrays` whose classifier rows are divided by their L2 norm to the power tau."""
    if tau == 0:
        return arrays
    weight = arrays[key].numpy()
    norms = np.linalg.norm(weight, axis=1, keepdims=True)
    scaled = weight / np.power(np.maximum(norms, 1e-12), tau)
    out = {k: (Array(np.asarray(scaled.astype(weight.dtype))) if k == key else v) for k, v in arrays.items()}
    return ArrayRecord(out)


def tau_norm_stage(cfg: Settings, ctx: ServerContext) -> Stages:
    """tau-normalise the final global model (`tau-norm` > 0), post hoc: after every other step on it (CCVR's
    re-trained classifier included); the rounds before train unchanged."""
    tau, last = cfg.tau_norm, cfg.num_server_rounds
    if tau == 0:
        return Stages()

    def stage(server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> Outcome:
        if server_round != last:
            return Outcome(arrays)
        metrics["tau-norm"] = tau
        return Outcome(tau_normalize(arrays, tau))

    return Stages(post_hoc=[stage])

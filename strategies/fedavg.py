"""Flower's own strategies as the registry builds them: FedAvg, FedProx (FedAvgM is `strategies.fedavgm`).

Every strategy here and in the other method modules samples the same way (`sampling`): a fraction of
all clients per round, evaluation on the server only, and round 1 waits for the whole federation.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy


def sampling(cfg: Mapping) -> dict:
    """Client sampling shared by every strategy: a fraction of all clients, centralized evaluation only."""
    return {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_available_nodes": int(cfg["num-clients"]),
    }


def fedavg(cfg: Mapping) -> Strategy:
    """FedAvg weighted by the clients' `num-examples`; centralized evaluation only."""
    return FedAvg(**sampling(cfg))


def fedprox(cfg: Mapping) -> Strategy:
    """Flower's FedProx: sends `proximal-mu` each round; the client adds (mu/2)||w - w_global||^2."""
    return FedProx(**sampling(cfg), proximal_mu=float(cfg["proximal-mu"]))

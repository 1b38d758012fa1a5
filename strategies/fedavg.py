"""Flower's own strategies as the registry builds them: FedAvg, FedProx (FedAvgM is `strategies.fedavgm`).

Every strategy here and in the other method modules samples the same way (`sampling`): a fraction of
all clients per round, evaluation on the server only, and round 1 waits for the whole federation.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from flcore.config import Settings


def sampling(cfg: Settings) -> dict:
    """Client sampling shared by every strategy: a fraction of all clients, centralized evaluation only."""
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_available_nodes": cfg.num_clients,
    }


def fedavg(cfg: Settings) -> Strategy:
    """FedAvg weighted by the clients' `num-examples`; centralized evaluation only."""
    return FedAvg(**sampling(cfg))


def fedprox(cfg: Settings) -> Strategy:
    """Flower's FedProx: sends `proximal-mu` each round; the client adds (mu/2)||w - w_global||^2."""
    return FedProx(**sampling(cfg), proximal_mu=cfg.proximal_mu)

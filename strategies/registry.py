"""Strategy registry: run-config name -> factory of a Flower Message-API strategy.

Every factory takes the validated run config. The ServerApp wraps whatever comes out in
`ServerStages`, so adding a strategy here needs no change in the apps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.serverapp.strategy import FedAvg, Strategy

StrategyFactory = Callable[[Mapping], Strategy]


def fedavg(cfg: Mapping) -> Strategy:
    """FedAvg weighted by the clients' `num-examples`; centralized evaluation only."""
    return FedAvg(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=int(cfg["num-clients"]),
    )


STRATEGIES: dict[str, StrategyFactory] = {"fedavg": fedavg}


def build_strategy(cfg: Mapping) -> Strategy:
    return STRATEGIES[str(cfg["strategy"])](cfg)

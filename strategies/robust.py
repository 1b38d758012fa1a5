"""Robust aggregation from Flower: coordinate-wise median and trimmed mean, which no single client steers.

FedAvg's weighted mean follows any client far enough from the others (bounded weights, `rounds.weights`,
limit how far). `fedmedian` (Yin et al., ICML 2018) takes each coordinate's median over the round's
updates and ignores `num-examples`; `fedtrimmedavg` drops the `trim-fraction` largest and smallest values
of each coordinate and averages the rest. Both are Flower's own strategies, sampled like every other.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Strategy

from flcore.config import ConfigError, Settings
from strategies.fedavg import sampling


def fedmedian(cfg: Settings) -> Strategy:
    """Flower's FedMedian: the coordinate-wise median of the round's updates."""
    return FedMedian(**sampling(cfg))


def fedtrimmedavg(cfg: Settings) -> Strategy:
    """Flower's FedTrimmedAvg: the coordinate-wise mean after cutting `trim-fraction` from each tail."""
    return FedTrimmedAvg(**sampling(cfg), beta=cfg.trim_fraction)


def check_trimming(cfg: Settings, prepared: object = None) -> None:
    """Refuse a trimmed mean that trims nothing: Flower cuts int(trim-fraction x replies) values from each tail,
    so with fewer than 1 / trim-fraction replies one hostile update goes into the mean untouched."""
    k, trim = cfg.clients_per_round, cfg.trim_fraction
    if int(trim * k) < 1:
        raise ConfigError(
            f"run-config key 'trim-fraction' = {trim!r} is not allowed with {k} clients per round (num-clients "
            f"{cfg.num_clients} x fraction-train {cfg.fraction_train}): int({trim} x {k}) = 0 values would be "
            f"trimmed from each tail, so fedtrimmedavg would average every update; use trim-fraction >= {1 / k:.3g} "
            "(and < 0.5) or more clients per round"
        )

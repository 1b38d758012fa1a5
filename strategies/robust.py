"""Robust aggregation from Flower: coordinate-wise median and trimmed mean, which no single client steers.

FedAvg's weighted mean follows any client far enough from the others (bounded weights, `rounds.weights`,
limit how far). `fedmedian` (Yin et al., ICML 2018) takes each coordinate's median over the round's
updates and ignores `num-examples`; `fedtrimmedavg` drops the `trim-fraction` largest and smallest values
of each coordinate and averages the rest. Both are Flower's own strategies, sampled like every other.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Strategy

from strategies.fedavg import sampling


def fedmedian(cfg: Mapping) -> Strategy:
    """Flower's FedMedian: the coordinate-wise median of the round's updates."""
    return FedMedian(**sampling(cfg))


def fedtrimmedavg(cfg: Mapping) -> Strategy:
    """Flower's FedTrimmedAvg: the coordinate-wise mean after cutting `trim-fraction` from each tail."""
    return FedTrimmedAvg(**sampling(cfg), beta=float(cfg["trim-fraction"]))

"""CLIP2FL (Shi et al., AAAI 2024): CReFF's server side plus CLIP knowledge distillation on every client.

The server is CReFF's (`strategies.creff`: federated features matched to client class gradients,
classifier re-trained on them). `RoundConfig` adds `kd-weight` and `kd-temperature` to every round's
train config; their presence is what makes a client run its CLIP teacher (`client_app.distill`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from rounds.delegate import Delegating
from strategies.creff import creff

KD_KEYS = ("kd-weight", "kd-temperature")


class RoundConfig(Delegating):
    """Any strategy, with fixed entries added to every round's train config."""

    def __init__(self, inner: Strategy, entries: Mapping[str, float]) -> None:
        super().__init__(inner)
        self.entries = dict(entries)

    def configure_train(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, ConfigRecord({**config, **self.entries}), grid)


def with_distillation(inner: Strategy, cfg: Mapping) -> Strategy:
    """`inner` (CReFF) whose clients also distil from CLIP with the configured weight and temperature."""
    return RoundConfig(inner, {key: float(cfg[key]) for key in KD_KEYS})


def clip2fl(cfg: Mapping) -> Strategy:
    """CReFF's server plus CLIP distillation on the clients (`client_app.distill`)."""
    return with_distillation(creff(cfg), cfg)

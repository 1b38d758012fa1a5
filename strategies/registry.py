"""Registries: run-config name -> factory of a Flower Message-API strategy, and the server stages.

Every strategy factory takes the validated run config. `build_strategy` wraps whatever comes out in
`ServerStages` together with the stages every entry of `SERVER_STAGES` contributes (each factory reads
its own switches from the config and returns no stages when it is off), so adding a strategy or a
server stage needs no change in the apps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.serverapp.strategy import FedAvg, Strategy

from pretrain.stage import pretrain_stage
from strategies.alignment import alignment_stages
from strategies.stages import RoundStage, ServerContext, ServerStages, Stages

StrategyFactory = Callable[[Mapping], Strategy]
StageFactory = Callable[[Mapping, ServerContext], Stages]


def fedavg(cfg: Mapping) -> Strategy:
    """FedAvg weighted by the clients' `num-examples`; centralized evaluation only."""
    return FedAvg(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=int(cfg["num-clients"]),
    )


STRATEGIES: dict[str, StrategyFactory] = {"fedavg": fedavg}

# Server stages in the order they run: stage 1 (pretraining) before round 1, stage 3 (alignment) after
# each aggregation. Later issues add their factories here.
SERVER_STAGES: dict[str, StageFactory] = {"pretrain": pretrain_stage, "align": alignment_stages}


def build_strategy(cfg: Mapping) -> Strategy:
    """The bare Flower strategy named by `strategy`."""
    return STRATEGIES[str(cfg["strategy"])](cfg)


def build_server_strategy(
    cfg: Mapping, ctx: ServerContext, observers: list[RoundStage] = (), **options
) -> ServerStages:
    """The configured strategy wrapped with every enabled server stage; `observers` run last each round.

    `options` go to `ServerStages` (resume: `round_offset`, `on_round_end`).
    """
    before, after = [], []
    for factory in SERVER_STAGES.values():
        stages = factory(cfg, ctx)
        before += stages.before_training
        after += stages.after_aggregation
    options = {"min_replies": int(cfg["min-replies"]), "seed": int(cfg["seed"]), **options}
    return ServerStages(build_strategy(cfg), before, after + list(observers), **options)

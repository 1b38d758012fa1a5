"""Registries: run-config name -> factory of a Flower Message-API strategy, and the server stages.

Every strategy factory takes the validated run config. `build_strategy` wraps whatever comes out in
`ServerStages` together with the stages every entry of `SERVER_STAGES` contributes (each factory reads
its own switches from the config and returns no stages when it is off), so adding a strategy or a
server stage needs no change in the apps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx, Strategy

from pretrain.stage import pretrain_stage
from strategies.alignment import alignment_stages
from strategies.clip2fl import with_distillation
from strategies.fednova import FedNova
from strategies.posthoc import tau_norm_stage
from strategies.stages import RoundStage, ServerContext, ServerStages, Stages
from strategies.uploads import ClientUploads, CReFFServer, ccvr_calibrate

StrategyFactory = Callable[[Mapping], Strategy]
StageFactory = Callable[[Mapping, ServerContext], Stages]


def _sampling(cfg: Mapping) -> dict:
    """Client sampling shared by every strategy: a fraction of all clients, centralized evaluation only."""
    return {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_available_nodes": int(cfg["num-clients"]),
    }


def fedavg(cfg: Mapping) -> Strategy:
    """FedAvg weighted by the clients' `num-examples`; centralized evaluation only."""
    return FedAvg(**_sampling(cfg))


def fedprox(cfg: Mapping) -> Strategy:
    """Flower's FedProx: sends `proximal-mu` each round; the client adds (mu/2)||w - w_global||^2."""
    return FedProx(**_sampling(cfg), proximal_mu=float(cfg["proximal-mu"]))


def fedavgm(cfg: Mapping) -> Strategy:
    """Flower's FedAvgM: server SGD with momentum on the averaged pseudo-gradient."""
    return FedAvgM(
        **_sampling(cfg), server_learning_rate=float(cfg["server-lr"]), server_momentum=float(cfg["server-momentum"])
    )


def fednova(cfg: Mapping) -> Strategy:
    """FedNova (strategies/fednova.py): updates normalised by each client's local step count."""
    return FedNova(FedAvg(**_sampling(cfg)))


def ccvr(cfg: Mapping) -> Strategy:
    """FedAvg, then CCVR in the last round: clients send class feature statistics, the server re-trains the head."""
    last = int(cfg["num-server-rounds"])
    return ClientUploads(FedAvg(**_sampling(cfg)), "feature-stats", lambda rnd: rnd == last, ccvr_calibrate(cfg))


def creff(cfg: Mapping) -> Strategy:
    """FedAvg plus CReFF every round: federated features from class gradients; clients train the plain aggregate."""
    server = CReFFServer(cfg)
    return ClientUploads(
        FedAvg(**_sampling(cfg)),
        "class-gradients",
        lambda rnd: True,
        server,
        train_on_calibrated=False,
        head=server.head,
    )


def clip2fl(cfg: Mapping) -> Strategy:
    """CReFF's server plus CLIP distillation on the clients (strategies/clip2fl.py, flcore/distill.py)."""
    return with_distillation(creff(cfg), cfg)


STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "fedavgm": fedavgm,
    "fednova": fednova,
    "ccvr": ccvr,
    "creff": creff,
    "clip2fl": clip2fl,
}

# Server stages in the order they run: stage 1 (pretraining) before round 1, stage 3 (alignment) after
# each aggregation. Later issues add their factories here.
# tau-norm is post-hoc: it acts on the final model only, so it stays last.
SERVER_STAGES: dict[str, StageFactory] = {
    "pretrain": pretrain_stage,
    "align": alignment_stages,
    "tau-norm": tau_norm_stage,
}


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
    options = {
        "min_replies": int(cfg["min-replies"]),
        "max_empty_rounds": int(cfg["max-empty-rounds"]),
        "seed": int(cfg["seed"]),
        **options,
    }
    return ServerStages(build_strategy(cfg), before, after + list(observers), **options)

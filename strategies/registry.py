"""Registries: run-config name -> factory of a Flower Message-API strategy, and the server stages.

Every strategy factory takes the validated run config; the method modules define them (`fedavg`,
`fedavgm`, `fednova`, `ccvr`, `creff`, `clip2fl`, `feddf`, `fedbe`, `ratio_loss`, `fedetf`, `fedloge`, `fedyoyo`).
`build_server_strategy` wraps whatever comes out in `rounds.policy.RoundPolicy` (sampling, reply screening) and
`strategies.wrapper.ServerStages` together with the stages every entry of `SERVER_STAGES` contributes
(each factory reads its own switches from the config and returns no stages when it is off), so adding a
strategy or a server stage needs no change in the apps. It returns the layers the ServerApp uses by name
(`ServerStrategy`), so the app never reaches through the wrappers. Each stage entry also names its input checks, and
a strategy with inputs of its own (CLIP2FL's teacher, the unlabeled images FedDF and FedBE distil on, the
Ratio Loss's auxiliary set) has an entry in `STRATEGY_CHECKS`; the preflight runs both before any process.
Client losses are registered in `flcore.losses` (`LOSSES`), because clients must not import this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from alignment import holdout
from alignment import stage as alignment
from flcore.config import Settings
from pretrain import stage as pretrain
from rounds.policy import RoundPolicy
from rounds.stage import ServerContext, ServerStage, Stages
from rounds.weights import WeightCaps
from strategies import clip2fl as clip2fl_method
from strategies import ensemble_distillation, ratio_loss
from strategies import fedloge as fedloge_method
from strategies.ccvr import ccvr
from strategies.creff import creff
from strategies.fedavg import fedavg, fedprox
from strategies.fedavgm import fedavgm
from strategies.fedbe import fedbe
from strategies.feddf import feddf
from strategies.fedetf import fedetf
from strategies.fednova import fednova
from strategies.fedyoyo import fedyoyo
from strategies.robust import check_trimming, fedmedian, fedtrimmedavg
from strategies.tau_norm import tau_norm_stage
from strategies.wrapper import Report, ServerStages

StrategyFactory = Callable[[Settings], Strategy]
MethodRoundEnd = Callable[[Strategy, int, ArrayRecord], None]  # (the method, the round just ended, its model)

STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "fedavgm": fedavgm,
    "fednova": fednova,
    "ccvr": ccvr,
    "creff": creff,
    "clip2fl": clip2fl_method.clip2fl,
    "fedmedian": fedmedian,
    "fedtrimmedavg": fedtrimmedavg,
    "feddf": feddf,
    "fedbe": fedbe,
    "ratioloss": ratio_loss.ratioloss,
    "fedetf": fedetf,
    "fedloge": fedloge_method.fedloge,
    "fedyoyo": fedyoyo,
}

# Input checks of strategies that read more than the config schema checks, run by the preflight.
STRATEGY_CHECKS: dict[str, Callable[[Settings, Any], None]] = {
    "clip2fl": clip2fl_method.check,
    "feddf": ensemble_distillation.check,
    "fedbe": ensemble_distillation.check,
    "ratioloss": ratio_loss.check,
    "fedtrimmedavg": check_trimming,
    "fedloge": fedloge_method.check,
}

# Server stages in the order they run: stage 1 (pretraining) before round 1, stage 3 (alignment) after
# each aggregation. tau-norm is post-hoc: it acts on the final model only, after the strategy's own last
# step (CCVR's calibration), so it stays last.
SERVER_STAGES: dict[str, ServerStage] = {
    "pretrain": ServerStage(pretrain.pretrain_stage, pretrain.check),
    "fedloge-sse": ServerStage(fedloge_method.sse_stage),  # FedLoGe's SSE-C into the initial model (strategy=fedloge)
    "align": ServerStage(alignment.alignment_stages, alignment.check),
    "holdout-teacher": ServerStage(holdout.report_stage, holdout.check_reserve),  # a summary section, no stage
    "tau-norm": ServerStage(tau_norm_stage),
}


def check_strategy(cfg: Settings, prepared: Any) -> None:
    """The chosen strategy's own input checks (`STRATEGY_CHECKS`), if it has any."""
    check = STRATEGY_CHECKS.get(cfg.strategy)
    if check is not None:
        check(cfg, prepared)


def build_strategy(cfg: Settings) -> Strategy:
    """The bare Flower strategy named by `strategy`."""
    return STRATEGIES[cfg.strategy](cfg)


def build_stages(cfg: Settings, ctx: ServerContext) -> Stages:
    """Every enabled server stage, in registry order."""
    stages = Stages()
    for entry in SERVER_STAGES.values():
        built = entry.build(cfg, ctx)
        stages.before_training += built.before_training
        stages.after_aggregation += built.after_aggregation
        stages.post_hoc += built.post_hoc
        stages.sections.update(built.sections)
    return stages


def weight_caps(cfg: Settings, ctx: ServerContext) -> WeightCaps:
    """Each partition of the server's split weighs at most its size; others by `max-examples`, `max-weight-ratio`;
    under them, the `weighting`."""
    sizes = ctx.data.client_histogram.sum(axis=1) if ctx is not None and ctx.data is not None else []
    known = {pid: int(n) for pid, n in enumerate(sizes)}
    return WeightCaps(float(cfg.max_examples), cfg.max_weight_ratio, known, cfg.weighting)


def server_partitions(cfg: Settings) -> int | None:
    """How many partitions the server gives out itself (`partition-assignment=server`); None where nodes say
    what they hold: their own partition (`node`), or their own data, which has none (`client-data=local`)."""
    if cfg.local_data or cfg.partition_assignment != "server":
        return None
    return cfg.num_clients


@dataclass(frozen=True)
class ServerStrategy:
    """The ServerApp's strategy stack, each layer the app uses named: it starts `strategy`, checkpoints and
    restores the state of `method`, and asks `policy` at the end whether any round aggregated an update."""

    strategy: ServerStages  # the whole stack: the server stages around the round policy around the method
    method: Strategy  # the training method's own strategy (`strategy` in the config): the state a run carries
    policy: RoundPolicy  # sampling and reply screening around the method


def build_server_strategy(
    cfg: Settings,
    ctx: ServerContext,
    report: Report,
    round_offset: int = 0,
    on_round_end: MethodRoundEnd | None = None,
) -> ServerStrategy:
    """The configured strategy under the round policy, wrapped with every enabled server stage; `on_round_end`
    is called after each round's evaluation with the method, whose state a checkpoint saves."""
    method = build_strategy(cfg)
    policy = RoundPolicy(
        method,
        min_replies=cfg.min_replies,
        max_empty_rounds=cfg.max_empty_rounds,
        seed=cfg.seed,
        partitions=server_partitions(cfg),
        weight_caps=weight_caps(cfg, ctx),
        max_upload_mb=cfg.max_upload_mb,
        max_update_ratio=cfg.max_update_ratio,
        on_node_data=report.record_nodes,
    )
    round_end = partial(on_round_end, method) if on_round_end is not None else None
    stages = ServerStages(
        policy,
        build_stages(cfg, ctx),
        report,
        round_offset=round_offset,
        on_round_end=round_end,
        method=cfg.strategy,
    )
    return ServerStrategy(stages, method, policy)


FEDRS_FORMS = {
    "authors": "the authors' code: logits without bias x alpha + (1 - alpha) n_c / max n, gradient clipped",
    "paper": "the paper's: logits of classes it lacks x alpha",
}
LOSS_RUNS: dict[str, Callable[[Settings], str]] = {
    "ce": lambda cfg: "ce loss",
    "focal": lambda cfg: f"focal loss (gamma {cfg.focal_gamma})",
    "fedlc": lambda cfg: f"FedLC's logit-calibrated CE (tau {cfg.fedlc_tau}) from its own label counts, which it keeps",
    "fedrs": lambda cfg: (
        f"FedRS's restricted softmax (alpha {cfg.fedrs_alpha}, {FEDRS_FORMS[cfg.fedrs_variant]}) from "
        "its own label counts, which it keeps"
    ),
}


def client_workload(cfg: Settings) -> dict[str, str]:
    """For the run summary: what each client uploads per round and what it runs, for an honest comparison."""
    per_round = "model weights (state dict) + scalar train metrics"
    if cfg.local_data:
        per_round += " + its image count per class"
    data = "its own data (client-data=local)" if cfg.local_data else "its partition"
    runs = f"local SGD on {data} with {LOSS_RUNS[cfg.loss](cfg)}"
    strategy = cfg.strategy
    if strategy == "ratioloss":
        runs = (
            "local SGD on its partition with the Ratio Loss: CE weighted per class by ratio-alpha + ratio-beta * Ra "
            f"(alpha {cfg.ratio_alpha}, beta {cfg.ratio_beta}); it receives the C class weights with the model every "
            "round and uploads nothing extra"
        )
    if strategy == "fedetf":
        runs = (
            "local SGD on its partition through FedETF's fixed ETF classifier with the balanced softmax (logits + "
            "log n_c from its own label counts, which it keeps)"
        )
        if cfg.fedetf_finetune_rounds > 0:
            per_round += "; after the last round, every client once: its fine-tuned model and its images per class"
            runs += (
                f"; after the last round FedETF's personalisation: one local update, then "
                f"{cfg.fedetf_finetune_rounds} x ({cfg.fedetf_finetune_epochs} epochs of the ETF, as many of its "
                "projection) on its partition"
            )
    if strategy == "fedloge":
        runs = (
            "local SGD on its partition through FedLoGe's fixed SSE-C (CE), and of the global head g_aux on the "
            "detached features (CE)"
        )
        if cfg.fedloge_local_epochs > 0:
            per_round += "; after the last round, every client once: its personalised model and its images per class"
            runs += (
                f"; after the last round FedLoGe's local head: {cfg.fedloge_local_epochs} epochs of a linear head on "
                "the final backbone's features, added to the global head realigned to its row norms"
            )
    if strategy == "fedyoyo":
        per_round += "; before training, its effective number per class under the received model (C floats)"
        runs = (
            "a feature pass over its partition with the received model (no training), then local SGD on a weak and "
            "a strong view (AutoAugment + Cutout) of every batch with FedYoYo's logit adjustment (the server's prior "
            f"drifting to its own label counts, which it keeps; tau {cfg.fedyoyo_tau}, gamma {cfg.fedyoyo_gamma}) and "
            f"self-distillation (lambda {cfg.fedyoyo_lambda}, warmup {cfg.fedyoyo_warmup} rounds, T "
            f"{cfg.fedyoyo_temperature})"
        )
    if strategy in ("feddf", "fedbe"):
        runs += (
            f"; nothing else: the server distils the round's client models ({strategy}) on its own unlabeled "
            f"images (distill-data {cfg.distill_data})"
        )
    if strategy == "fedprox":
        runs += f" + FedProx proximal term (mu {cfg.proximal_mu})"
    if strategy == "ccvr":
        per_round += (
            "; after the last round, every client once: per-class feature count, mean [C, D] and covariance "
            "[C, D, D] under the final global model (the last aggregate after the server stages: aligned under align)"
        )
        runs += "; after the last round a feature pass over its data with the final global model (no training)"
    if strategy in ("creff", "clip2fl"):
        per_round += "; every round also: per-class classifier gradients [C, C, D] + [C, C] and class counts"
        runs += (
            "; every round also 10 draws of up to 32 images per class"
            + (" (each DSA-augmented)" if cfg.creff_dsa else "")
            + ", their features and per-class CE gradients of the global classifier"
        )
    if strategy == "clip2fl":
        runs += (
            f"; CLIP teacher {cfg.align_teacher} ({cfg.align_pretrained}) ON THE CLIENT: one zero-shot forward "
            f"over its partition (cached, prompt {cfg.clip2fl_prompt!r}), KD term weight {cfg.kd_weight} at "
            f"temperature {cfg.kd_temperature}"
        )
    return {"client-uploads": per_round, "client-runs": runs}

"""FedLoGe (Xiao et al., ICLR 2024, "FedLoGe: Joint Local and Generic Federated Learning under Long-tailed Data";
code github:ZackZikaiXiao/FedLoGe): FedAvg over a model whose backbone trains through a static sparse ETF
classifier (SSE-C) and whose averaged global head g_aux, realigned, is the generic model.

The model is the run's backbone and head with `flcore.fedloge.FedLoGeClassifier` in place of the linear
classifier. Before round 1 the server draws the SSE-C once (`sse_stage`, a server stage in the registry: a simplex
ETF from the run's seed, a fraction `fedloge-sparsity` of its entries zeroed, then `fedloge-etf-steps` Adam steps
on the rest, their `gen_sparse_ETF`) and puts it in the initial global model; every client reads it from there and
never trains it, and FedAvg's mean of identical copies leaves it where it is. Clients train the backbone with
cross-entropy through the SSE-C and g_aux with cross-entropy on the detached features (`flcore.losses`'s
`CLIENT_OBJECTIVES`); the server averages everything as FedAvg does. The global model's forward, the one the server
evaluates (the table's column) and stage 3 aligns, is g_aux with its rows realigned to norm 1.7.

After the last round (after the server stages, so under `align` the aligned model) every client fits its own local
head on the final backbone's features and sends back its personalised model (`flcore.personalize`), which the
server scores under the client's class mix (`strategies.personalization`): `personalized-accuracy` in the last
round's metrics; `fedloge-local-epochs=0` skips it.
"""

from __future__ import annotations

import math
import time
from logging import INFO

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.config import ConfigError, Settings
from flcore.fedloge import sparsify_etf
from flcore.models import classifier_width, orthonormal_basis, simplex_etf
from rounds.stage import Outcome, ServerContext, Stages
from strategies.fedavg import sampling
from strategies.personalization import Personalization

SSE_KEYS = ("classifier.sse", "classifier.sse_bias")  # the global model's SSE-C entries


def draw_sse(width: int, classes: int, sparsity: float, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSE-C's weight [C, d] and bias [C], drawn from `seed`: the simplex ETF on an orthonormal basis of a
    uniform draw (their `ETF_Classifier`), `int(sparsity * d * C)` entries zeroed at random, `sparsify_etf`; the bias
    from nn.Linear's initial range U(-1/sqrt(d), 1/sqrt(d)), as their SSE-C keeps it."""
    gen = torch.Generator().manual_seed(seed)
    dense = simplex_etf(orthonormal_basis(torch.rand(width, classes, generator=gen)))
    zeros = torch.zeros(width * classes, dtype=torch.bool)
    zeros[torch.randperm(width * classes, generator=gen)[: int(sparsity * width * classes)]] = True
    weight = sparsify_etf(dense, zeros.view(width, classes), steps)
    bound = 1.0 / math.sqrt(width)
    bias = torch.rand(classes, generator=gen) * (2 * bound) - bound
    return weight.t().contiguous(), bias


def with_sse(arrays: ArrayRecord, weight: torch.Tensor, bias: torch.Tensor) -> ArrayRecord:
    """`arrays` with the SSE-C entries replaced; everything else unchanged."""
    state = arrays.to_torch_state_dict()
    for key, value in zip(SSE_KEYS, (weight, bias), strict=True):
        if key not in state or state[key].shape != value.shape:
            raise KeyError(f"the global model has no SSE-C entry {key} of shape {tuple(value.shape)}")
        state[key] = value.to(state[key].dtype)
    return ArrayRecord(state)


def sse_stage(cfg: Settings, ctx: ServerContext) -> Stages:
    """The registry's server stage: with `strategy=fedloge`, the initial global model gets the SSE-C."""
    if cfg.strategy != "fedloge":
        return Stages()

    def put_sse(arrays: ArrayRecord) -> Outcome:
        start = time.perf_counter()
        classes = ctx.data.dataset.num_classes
        weight, bias = draw_sse(classifier_width(cfg), classes, cfg.fedloge_sparsity, cfg.fedloge_etf_steps, cfg.seed)
        seconds = time.perf_counter() - start
        log(INFO, "FedLoGe: SSE-C [%d x %d] drawn in %.1f s", *weight.shape, seconds)
        info = {"sparsity": cfg.fedloge_sparsity, "etf-steps": cfg.fedloge_etf_steps, "seconds": seconds}
        return Outcome(with_sse(arrays, weight, bias), {"fedloge-sse": info})

    return Stages(before_training=[put_sse])


def check(cfg: Settings, prepared) -> None:
    """The SSE-C's simplex ETF needs a classifier input at least as wide as the classes (d >= C)."""
    if cfg.strategy != "fedloge":
        return
    width, classes = classifier_width(cfg), prepared.dataset.num_classes
    if width < classes:
        raise ConfigError(
            f"strategy 'fedloge' needs a classifier input at least as wide as the {classes} classes for its simplex "
            f"ETF, but the model's is {width}: raise projection-dim or pick another head."
        )


def fedloge(cfg: Settings) -> Strategy:
    """FedAvg whose clients train FedLoGe's model (`flcore.models.METHOD_CLASSIFIERS`), and fit their local heads
    after the last round."""
    return Personalization(FedAvg(**sampling(cfg)), cfg, cfg.fedloge_local_epochs > 0)

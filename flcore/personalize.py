"""Client half of a method's personalisation: after the last round, a client fine-tunes the final global model
on its own data, the method's own way, and sends the result back for scoring (`strategies.personalization`).

FedETF's (Li et al., ICCV 2023; `Client_personalization` in ZexiLee/ICCV-2023-FedETF's `client_funct.py`):
one more local update of the whole model with the balanced softmax (the round's training settings), then
`fedetf-finetune-rounds` alternations of `fedetf-finetune-epochs` epochs of the ETF alone (plain SGD at
`fedetf-etf-lr`) and as many of the ETF classifier's projection alone (SGD at `fedetf-projection-lr` with the
run's momentum and weight decay), both with plain cross-entropy of the scaled logits, the model in training mode
(BatchNorm's statistics follow the client's data, as in their loop). The ETF, fixed during federated training,
is the personal classifier here, so it becomes a parameter of the client's copy for this step.

FedLoGe's (Xiao et al., ICLR 2024; `flcore.fedloge`): the client fits its own linear head l_head on the final
global backbone's features (cross-entropy, `fedloge-local-epochs` epochs of the run's local SGD, the backbone in
eval mode and untouched), then its personalised head is l_head plus the global head g_aux with g_aux's rows
rescaled to l_head's row lengths, the classes it has no images of masked (`FedLoGeClassifier.personalize`).

Lives in `flcore` because clients must not import `strategies`; `PERSONALIZERS` maps a strategy to its step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flcore.batches import Batches
from flcore.config import Settings
from flcore.device import CPU, Compute
from flcore.fedloge import FedLoGeClassifier
from flcore.losses import LossFn, balanced_log_prior, balanced_softmax_loss
from flcore.training import TrainSettings, train

PERSONALIZE_ACTION = "personalize"  # message type query.personalize: fine-tune the model it carries, reply with it
Personalizer = Callable[..., nn.Module]


def fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    batches: Batches,
    opt: torch.optim.Optimizer,
    epochs: int,
    augment: bool,
    gen: torch.Generator,
    loss_fn: LossFn = F.cross_entropy,
) -> None:
    """`epochs` of SGD on `params` only: every other parameter is frozen for the call, BatchNorm in training mode."""
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    model.train()
    for _ in range(epochs):
        for x, y in batches.iterate(shuffle=True, augment=augment, gen=gen):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(True)


def fedetf_personalize(
    model: nn.Module,
    batches: Batches,
    cfg: Settings,
    counts: np.ndarray,
    gen: torch.Generator,
    compute: Compute = CPU,
) -> nn.Module:
    """FedETF's local fine-tuning of a copy of `model` (the module docstring); the copy, its ETF a parameter."""
    local = copy.deepcopy(model)
    head = local.classifier
    settings = TrainSettings.from_config(cfg)
    balanced = partial(balanced_softmax_loss, log_prior=balanced_log_prior(counts))
    train(local, batches, settings, gen, balanced, compute=compute)
    head.etf = nn.Parameter(head.etf.detach().clone())
    rounds, epochs = cfg.fedetf_finetune_rounds, cfg.fedetf_finetune_epochs
    momentum, decay = cfg.momentum, cfg.weight_decay
    for _ in range(rounds):
        etf_opt = torch.optim.SGD([head.etf], lr=cfg.fedetf_etf_lr)
        fit(local, [head.etf], batches, etf_opt, epochs, settings.augment, gen)
        projection = list(head.projection.parameters())
        proj_opt = torch.optim.SGD(projection, lr=cfg.fedetf_projection_lr, momentum=momentum, weight_decay=decay)
        fit(local, projection, batches, proj_opt, epochs, settings.augment, gen)
    return local


def new_local_head(model: nn.Module, gen: torch.Generator, compute: Compute = CPU) -> nn.Linear:
    """A client's l_head before training: nn.Linear's initial draw over `model`'s classifier input, seeded from
    `gen` (the client's personalisation stream)."""
    head = model.classifier.g_aux
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        return nn.Linear(head.in_features, head.out_features).to(compute.device)


def fit_local_head(
    model: nn.Module,
    l_head: nn.Linear,
    batches: Batches,
    settings: TrainSettings,
    gen: torch.Generator,
    compute: Compute = CPU,
) -> nn.Linear:
    """`l_head` trained with cross-entropy on the features of `model`'s backbone (eval mode: it does not move)
    with the local SGD `settings` (their `update_weights_gaux`'s l_head step on a backbone that stands still)."""
    opt = torch.optim.SGD(
        l_head.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    model.eval()
    for _ in range(settings.epochs):
        for x, y in batches.iterate(shuffle=True, augment=settings.augment, gen=gen):
            with torch.no_grad(), compute.autocast():
                features = model.embed(x)
            loss = F.cross_entropy(l_head(features.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return l_head


def fedloge_personalize(
    model: nn.Module,
    batches: Batches,
    cfg: Settings,
    counts: np.ndarray,
    gen: torch.Generator,
    compute: Compute = CPU,
) -> nn.Module:
    """A copy of the final global model with the client's personalised head (`fit_local_head` for
    `fedloge-local-epochs` epochs, then `FedLoGeClassifier.personalize`); its backbone is the global one."""
    local = copy.deepcopy(model)
    settings = TrainSettings.from_config(cfg.with_(local_epochs=cfg.fedloge_local_epochs))
    l_head = fit_local_head(local, new_local_head(local, gen, compute), batches, settings, gen, compute)
    head: FedLoGeClassifier = local.classifier
    head.personalize(l_head, counts)
    return local


PERSONALIZERS: dict[str, Personalizer] = {"fedetf": fedetf_personalize, "fedloge": fedloge_personalize}

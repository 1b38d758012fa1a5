"""Client half of a method's personalisation: after the last round, a client fine-tunes the final global model
on its own data, the method's own way, and sends the result back for scoring (`strategies.personalization`).

FedETF's (Li et al., ICCV 2023; `Client_personalization` in ZexiLee/ICCV-2023-FedETF's `client_funct.py`):
one more local update of the whole model with the balanced softmax (the round's training settings), then
`fedetf-finetune-rounds` alternations of `fedetf-finetune-epochs` epochs of the ETF alone (plain SGD at
`fedetf-etf-lr`) and as many of the ETF classifier's projection alone (SGD at `fedetf-projection-lr` with the
run's momentum and weight decay), both with plain cross-entropy of the scaled logits, the model in training mode
(BatchNorm's statistics follow the client's data, as in their loop). The ETF, fixed during federated training,
is the personal classifier here, so it becomes a parameter of the client's copy for this step.

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


PERSONALIZERS: dict[str, Personalizer] = {"fedetf": fedetf_personalize}

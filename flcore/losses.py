"""Client losses: the ones the `loss` run-config key selects, and the one a strategy's round config selects.

Fed-Focal (Sarkar et al., 2020) replaces the clients' cross-entropy with the focal loss (Lin et al.,
2017), which down-weights examples the model already classifies well, so the rare classes of a
long-tailed client weigh more: FL = -(1 - p_t)^gamma * log p_t. With gamma = 0 it is cross-entropy.

FedLC (Zhang et al., ICML 2022) and FedRS (Li and Zhan, KDD 2021) change the softmax with the client's
own label counts, which never leave the client: FedLC subtracts tau * n_c^(-1/4) from the logit of each
class c before the cross-entropy (a larger margin for the client's rare classes), FedRS scales down the
logits of the classes the client lacks, so the client pushes them down less. FedRS comes in two forms
(`fedrs-variant`): the paper's, which multiplies the logits of absent classes by alpha, and its authors'
code's (FedRepo), which scales every class by alpha + (1 - alpha) * n_c / max n, leaves the classifier's
bias out of the logits and clips the gradient.

The Ratio Loss (Wang et al., AAAI 2021) weights each example's cross-entropy by a per-class weight the
server estimates every round (`strategies.ratio_loss`) and sends in the round config; a strategy that
defines its clients' loss names it under `LOSS_KEY`, so it lives in `SERVER_LOSSES`, not in `LOSSES`.

FedETF (Li et al., ICCV 2023) trains its clients with the balanced softmax (Ren et al., NeurIPS 2020) through
its fixed ETF classifier: the cross-entropy of f_c + log n_c, n_c the client's own images of class c (an absent
class counts as one), so a client's head classes need a larger margin and its tail classes are not pushed down.
Its strategy names it in the round config, so it lives in `SERVER_LOSSES`.

FedLoGe (Xiao et al., ICLR 2024) trains a client through two heads at once: the backbone through its fixed sparse
ETF classifier, its global head on the features with the backbone's gradient cut. Its entry in
`CLIENT_OBJECTIVES` hands the training loop the model as `flcore.fedloge.ClientStep` and a loss that adds the
global head's cross-entropy to the client's loss (`client_objective`).
FedYoYo (arXiv 2503.06916) trains on a weak and a strong view of every batch with logits adjusted by a class prior
that starts at the server's and drifts towards the client's own distribution, plus a self-distillation term from
the weak view to the strong one (`flcore.yoyo`); its strategy names it and sends the prior, so it lives in
`SERVER_LOSSES`.

`kd_loss` is the one distillation loss of the project: CLIP2FL's clients (`client_app.distill`), the
server's global alignment (`alignment.loss`) and FedDF/FedBE's server distillation use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from flcore.arrays import read_npy
from flcore.config import Settings
from flcore.fedloge import client_objective
from flcore.yoyo import YOYO_LOSS, yoyo_client_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSS_KEY = "loss"  # round-config key through which a strategy names its clients' loss
RATIO_WEIGHTS_KEY = "ratio-weights"  # round-config key: the Ratio Loss's per-class weights, .npy bytes
FEDLC_MIN_COUNT = 1e-8  # a class the client lacks counts as 1e-8 images: its logit drops by 100 * tau
FEDRS_MAX_GRAD_NORM = 100.0  # FedRepo's max_grad_norm (its config.py, every dataset)


@dataclass(frozen=True)
class LossInputs:
    """What a client knows when it builds its loss: the run config, its own images per class, the round
    config the server sent, and its model's classifier bias (the live parameter: FedRS's authors' logits
    leave it out)."""

    cfg: Settings
    label_counts: np.ndarray
    server_config: Mapping = field(default_factory=dict)
    classifier_bias: torch.Tensor | None = None


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss over the batch, computed from log-probabilities for numerical stability."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    weight = (1.0 - log_pt.exp()).clamp(min=0.0).pow(gamma) if gamma else 1.0
    return -(weight * log_pt).mean()


def fedlc_offsets(label_counts: np.ndarray, tau: float) -> torch.Tensor:
    """FedLC's calibration tau * n_c^(-1/4) per class; absent classes count as `FEDLC_MIN_COUNT` images."""
    counts = torch.as_tensor(np.maximum(np.asarray(label_counts, np.float64), FEDLC_MIN_COUNT))
    return (tau * counts.pow(-0.25)).float()


def fedlc_loss(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the calibrated logits f_c - tau * n_c^(-1/4).

    The paper's Eq. sums the denominator over y' != y only; read literally the loss has no lower bound
    and training collapses (FL-bench issue #5), so the softmax runs over every class, as FL-bench and
    fluke implement it.
    """
    return F.cross_entropy(logits - offsets.to(logits), labels)


def fedrs_scale(label_counts: np.ndarray, alpha: float, variant: str = "authors") -> torch.Tensor:
    """FedRS's scale per class. The paper's: 1 for the classes the client holds, alpha for the ones it lacks.
    Its authors' code: alpha + (1 - alpha) * n_c / max n, so only the client's largest class keeps its whole
    logit and a held class is restricted the less the more images of it the client has."""
    counts = np.asarray(label_counts, np.float64)
    if variant == "paper":
        return torch.where(torch.as_tensor(counts > 0), 1.0, float(alpha))
    share = counts / counts.max() if counts.max() > 0 else np.zeros_like(counts)
    return torch.as_tensor(alpha + (1.0 - alpha) * share).float()


def fedrs_loss(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of the restricted softmax scale_c * f_c. With `bias` (the authors' form) f_c is the
    logit without the classifier's bias, w_c . h, as FedRepo computes it: the loss then gives the bias no
    gradient."""
    if bias is not None:
        logits = logits - bias
    return F.cross_entropy(logits * scale.to(logits), labels)


def ratio_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Ratio Loss: -w_y log p_y averaged over the batch (the authors' mean, not PyTorch's weight-normalised one)."""
    per_example = F.cross_entropy(logits, labels, reduction="none")
    return (weights.to(logits)[labels] * per_example).mean()


def balanced_log_prior(label_counts: np.ndarray) -> torch.Tensor:
    """log n_c per class, with absent classes counted as one image (FedETF's `generate_sample_per_class`)."""
    counts = np.maximum(np.asarray(label_counts, np.float64), 1.0)
    return torch.as_tensor(np.log(counts)).float()


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Balanced softmax: cross-entropy of f_c + log n_c (FedETF's `balanced_softmax_loss`)."""
    return F.cross_entropy(logits + log_prior.to(logits), labels)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch (Hinton et al.)."""
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def _ratio(inputs: LossInputs) -> LossFn:
    """The Ratio Loss with the weights of this round's config, checked to be one non-negative weight per class."""
    if RATIO_WEIGHTS_KEY not in inputs.server_config:
        raise ValueError(f"the server asked for the ratio loss but sent no '{RATIO_WEIGHTS_KEY}' in the round config")
    weights = read_npy(RATIO_WEIGHTS_KEY, inputs.server_config[RATIO_WEIGHTS_KEY])
    classes = len(inputs.label_counts)
    if weights.shape != (classes,) or (weights < 0).any():
        raise ValueError(
            f"the server's '{RATIO_WEIGHTS_KEY}' must be {classes} non-negative class weights, got shape "
            f"{weights.shape}"
        )
    return partial(ratio_loss, weights=torch.from_numpy(weights.astype(np.float32)))


def _fedrs(inputs: LossInputs) -> LossFn:
    """FedRS in the form `fedrs-variant` names: the authors' leaves the bias out of the logits."""
    variant = inputs.cfg.fedrs_variant
    scale = fedrs_scale(inputs.label_counts, inputs.cfg.fedrs_alpha, variant)
    return partial(fedrs_loss, scale=scale, bias=inputs.classifier_bias if variant == "authors" else None)


LOSSES: dict[str, Callable[[LossInputs], LossFn]] = {
    "ce": lambda inputs: F.cross_entropy,
    "focal": lambda inputs: partial(focal_loss, gamma=inputs.cfg.focal_gamma),
    "fedlc": lambda inputs: partial(fedlc_loss, offsets=fedlc_offsets(inputs.label_counts, inputs.cfg.fedlc_tau)),
    "fedrs": _fedrs,
}

# Losses only a strategy selects, through `LOSS_KEY` in its round config.
SERVER_LOSSES: dict[str, Callable[[LossInputs], LossFn]] = {
    "ratio": _ratio,
    "balanced-softmax": lambda inputs: partial(
        balanced_softmax_loss, log_prior=balanced_log_prior(inputs.label_counts)
    ),
    YOYO_LOSS: lambda inputs: yoyo_client_loss(inputs.cfg, inputs.label_counts, inputs.server_config),
}


# Strategies whose clients train another module than the model, or the model through more than its logits:
# strategy -> fn(model, the client's loss) -> (the module `flcore.training.train` runs, the loss it takes).
CLIENT_OBJECTIVES: dict[str, Callable[[torch.nn.Module, LossFn], tuple[torch.nn.Module, LossFn]]] = {
    "fedloge": client_objective,
}


def objective(cfg: Settings, model: torch.nn.Module, loss: LossFn) -> tuple[torch.nn.Module, LossFn]:
    """What the client trains and with which loss: the strategy's `CLIENT_OBJECTIVES` entry, else `model` and `loss`."""
    wrap = CLIENT_OBJECTIVES.get(cfg.strategy)
    return (model, loss) if wrap is None else wrap(model, loss)


def loss_name(cfg: Settings, server_config: Mapping) -> str:
    """The loss the round config names (`LOSS_KEY`), else the run config's `loss`."""
    return str(server_config.get(LOSS_KEY, cfg.loss))


def max_grad_norm(cfg: Settings, server_config: Mapping) -> float:
    """The gradient clipping that comes with the client's loss: FedRS's authors clip, the others do not (0)."""
    if loss_name(cfg, server_config) == "fedrs" and cfg.fedrs_variant == "authors":
        return FEDRS_MAX_GRAD_NORM
    return 0.0


def build_loss(inputs: LossInputs) -> LossFn:
    """The loss `loss_name` picks, for this client's inputs."""
    name = loss_name(inputs.cfg, inputs.server_config)
    known = {**LOSSES, **SERVER_LOSSES}
    if name not in known:
        raise ValueError(f"the server asked for loss {name!r}; this client knows {', '.join(known)}")
    return known[name](inputs)

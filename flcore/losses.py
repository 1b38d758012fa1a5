"""Client losses selectable with the `loss` run-config key.

Fed-Focal (Sarkar et al., 2020) replaces the clients' cross-entropy with the focal loss (Lin et al.,
2017), which down-weights examples the model already classifies well, so the rare classes of a
long-tailed client weigh more: FL = -(1 - p_t)^gamma * log p_t. With gamma = 0 it is cross-entropy.

`kd_loss` is the one distillation loss of the project: CLIP2FL's clients (`client_app.distill`) and the
server's global alignment (`alignment.loss`) both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss over the batch, computed from log-probabilities for numerical stability."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    weight = (1.0 - log_pt.exp()).clamp(min=0.0).pow(gamma) if gamma else 1.0
    return -(weight * log_pt).mean()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch (Hinton et al.)."""
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


LOSSES: dict[str, Callable[[Mapping], LossFn]] = {
    "ce": lambda cfg: F.cross_entropy,
    "focal": lambda cfg: partial(focal_loss, gamma=float(cfg["focal-gamma"])),
}


def build_loss(cfg: Mapping) -> LossFn:
    """The loss named by the run config's `loss` key."""
    return LOSSES[str(cfg["loss"])](cfg)

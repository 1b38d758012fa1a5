"""Local training and evaluation loops shared by clients, the server stages and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flcore.data import Batches

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Local SGD settings; the server sends them to clients every round in the train ConfigRecord."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    augment: bool = True
    proximal_mu: float = 0.0

    @classmethod
    def from_config(cls, cfg: Mapping) -> TrainSettings:
        return cls(
            int(cfg["local-epochs"]),
            float(cfg["lr"]),
            float(cfg["momentum"]),
            float(cfg["weight-decay"]),
            bool(cfg["augment"]),
            float(cfg.get("proximal-mu", 0.0)),
        )


def train(
    model: nn.Module, batches: Batches, settings: TrainSettings, gen: torch.Generator, loss_fn: LossFn = F.cross_entropy
) -> dict[str, float]:
    """Plain SGD over the client's data; with proximal_mu > 0 adds FedProx's (mu/2)||w - w_global||^2."""
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(settings.epochs):
        for x, y in batches.iterate(shuffle=True, augment=settings.augment, gen=gen):
            logits = model(x)
            loss = loss_fn(logits, y)
            if anchor is not None:
                loss = loss + 0.5 * settings.proximal_mu * sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps += 1
    return {"train-loss": total_loss / max(seen, 1), "train-accuracy": correct / max(seen, 1), "local-steps": steps}


@torch.no_grad()
def predict(model: nn.Module, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels over a whole set, in order."""
    model.eval()
    preds, labels = [], []
    for x, y in batches.iterate():
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()

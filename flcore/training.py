"""Local training and evaluation loops shared by clients, the server stages and the benchmarks.

They run where the batches and the model are (`flcore.device`), in the precision `compute.amp` asks. The
loss and accuracy sums stay on the device (float64, the same numbers as summing Python floats) and are read
once per call, so a GPU never waits for the host between steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flcore.arrays import NON_FINITE
from flcore.batches import Batches
from flcore.config import Settings
from flcore.device import CPU, Compute
from flcore.progress import progress as progress_of

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ExtraLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, batch positions in the data) -> term


class NonFiniteLogits(FloatingPointError):
    """The model gave NaN or Inf logits: there is no prediction to score (argmax of an all-NaN row is 0,
    so such a model would otherwise be scored as if it predicted class 0)."""


# The run-config keys of local training that the server's round config may set (the server sends all but
# proximal-mu every round; FedProx adds proximal-mu).
ROUND_KEYS = ("local-epochs", "lr", "momentum", "weight-decay", "augment", "proximal-mu")


@dataclass(frozen=True)
class TrainSettings:
    """Local SGD settings; the server sends them to clients every round in the train ConfigRecord."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    augment: bool = True
    proximal_mu: float = 0.0
    max_grad_norm: float = 0.0  # clip the gradient's global norm to this before each step; 0 = no clipping

    @classmethod
    def from_config(cls, cfg: Settings) -> TrainSettings:
        return cls(
            cfg.local_epochs,
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
            cfg.augment,
            cfg.proximal_mu,
        )

    @classmethod
    def for_round(cls, cfg: Settings, round_config: Mapping) -> TrainSettings:
        """The run's settings overlaid with what the round config sets of them (`ROUND_KEYS`, checked like the run
        config); the proximal term only when the round config sends it."""
        own = {key: value for key, value in round_config.items() if key in ROUND_KEYS}
        return cls.from_config(cfg.with_(proximal_mu=0.0).overlay(own))


def _batches(batches: Batches, augment: bool, gen: torch.Generator, indexed: bool) -> Iterator[tuple]:
    """Shuffled (positions, x, y); positions only when asked, so any object with `iterate` still trains."""
    if indexed:
        yield from batches.iterate_indexed(shuffle=True, augment=augment, gen=gen)
    else:
        for x, y in batches.iterate(shuffle=True, augment=augment, gen=gen):
            yield None, x, y


def train(
    model: nn.Module,
    batches: Batches,
    settings: TrainSettings,
    gen: torch.Generator,
    loss_fn: LossFn = F.cross_entropy,
    extra_loss: ExtraLoss | None = None,
    compute: Compute = CPU,
    progress: str = "",
) -> dict[str, float]:
    """Plain SGD over the client's data; with proximal_mu > 0 adds FedProx's (mu/2)||w - w_global||^2, and
    with max_grad_norm > 0 clips each step's gradient (FedRS's authors' client does).

    `extra_loss` gets the logits and the batch's positions in the data, so a per-example term (CLIP2FL's
    distillation from cached teacher logits) is added without changing the loss signature of other callers.
    `train-seconds` and `train-images-per-second` are the loop's own wall time and throughput, so a run can
    tell client compute from what surrounds it (messaging, set-up, the server's work). A `progress` name shows
    the steps done and the time left under it (a long server-side training; clients' rounds pass none).
    """
    start = time.perf_counter()
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    scaler = compute.scaler()
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
    total_loss = torch.zeros((), dtype=torch.float64, device=compute.device)
    correct = torch.zeros((), dtype=torch.int64, device=compute.device)
    seen, steps = 0, 0
    bar = progress_of(total=settings.epochs * len(batches), desc=progress, unit="step") if progress else None
    for _ in range(settings.epochs):
        for idx, x, y in _batches(batches, settings.augment, gen, indexed=extra_loss is not None):
            with compute.autocast():
                logits = model(x)
                loss = loss_fn(logits, y)
                if extra_loss is not None:
                    loss = loss + extra_loss(logits, idx)
                if anchor is not None:
                    loss = loss + 0.5 * settings.proximal_mu * sum(
                        (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                    )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.max_grad_norm > 0:
                scaler.unscale_(opt)  # clip the true gradient, not fp16's scaled one
                nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            total_loss += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            steps += 1
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    return {
        "train-loss": float(total_loss) / max(seen, 1),
        "train-accuracy": int(correct) / max(seen, 1),
        "local-steps": steps,
        "train-seconds": seconds,
        "train-images-per-second": seen / max(seconds, 1e-9),
    }


@torch.no_grad()
def predict(model: nn.Module, batches: Batches, compute: Compute = CPU) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels over a whole set, in order; `NonFiniteLogits` if any logit is NaN or Inf.

    The count of such rows stays on the device and is read once, with the predictions.
    """
    model.eval()
    preds, labels, broken = [], [], 0
    for x, y in batches.iterate():
        with compute.autocast():
            logits = model(x)
        broken = broken + (~torch.isfinite(logits)).any(1).sum()
        preds.append(logits.argmax(1))
        labels.append(y)
    predicted, truth = torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy()
    if int(broken):
        raise NonFiniteLogits(f"{NON_FINITE} logits for {int(broken)} of {len(truth)} images")
    return predicted, truth

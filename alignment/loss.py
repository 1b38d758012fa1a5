"""The alignment loss and the fine-tuning loop on D_align.

    L = CE(y, p) + beta * T^2 * KL(softmax(q / T) || softmax(p / T)),

where p are the model's logits and q the teacher's. The KL term is `flcore.losses.kd_loss`, the same
distillation loss CLIP2FL's clients use. Fine-tuning runs through the clients' own training loop
(`flcore.training.train`) with batches that carry each image's D_align position, so the loss can look up
both the label and the teacher's logits; with beta = 0 it is exactly CE fine-tuning on D_align. It runs on the
run's device and precision (`flcore.device`), where D_align, its labels and q move once per alignment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flcore.batches import Batches
from flcore.config import Settings
from flcore.datasets import Dataset, ImageSet
from flcore.device import CPU, Compute
from flcore.losses import kd_loss
from flcore.training import TrainSettings, train


@dataclass(frozen=True)
class AlignSettings:
    """The alignment's optimisation settings; `beta` is the effective one (0 for a random teacher)."""

    steps: int
    lr: float
    batch_size: int
    beta: float
    temperature: float
    loss: str
    when: str
    augment: bool

    @classmethod
    def from_config(cls, cfg: Settings, beta: float) -> AlignSettings:
        return cls(
            cfg.align_steps,
            cfg.align_lr,
            cfg.align_batch_size,
            beta,
            cfg.align_temperature,
            cfg.align_loss,
            cfg.align_when,
            cfg.augment,
        )


class AlignLoss:
    """CE and T^2-scaled KL(q || p) on batches whose labels are D_align positions (to look up y and q)."""

    def __init__(self, labels: torch.Tensor, q: torch.Tensor, settings: AlignSettings) -> None:
        self.labels, self.q, self.s = labels, q, settings
        self.sums = {"align-ce": 0.0, "align-kl": 0.0}
        self.seen = 0

    def __call__(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        s, n = self.s, len(idx)
        loss = logits.new_zeros(())
        if s.loss != "kl":
            ce = F.cross_entropy(logits, self.labels[idx])
            self.sums["align-ce"] += ce.item() * n
            loss = loss + ce
        if s.loss != "ce" and s.beta > 0:
            kd = kd_loss(logits, self.q[idx], s.temperature)
            self.sums["align-kl"] += kd.item() / s.temperature**2 * n
            loss = loss + s.beta * kd
        self.seen += n
        return loss

    def means(self) -> dict[str, float]:
        return {k: v / max(self.seen, 1) for k, v in self.sums.items()}


class StepBatches:
    """The first `steps` batches of D_align's shuffled epochs, one epoch after another (one `train` epoch)."""

    def __init__(self, batches: Batches, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def iterate(
        self, shuffle: bool, augment: bool, gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        done = 0
        while done < self.steps:
            for batch in self.batches.iterate(shuffle=shuffle, augment=augment, gen=gen):
                yield batch
                done += 1
                if done == self.steps:
                    return


def fine_tune(
    model: nn.Module,
    align: ImageSet,
    dataset: Dataset,
    image_size: int,
    q: torch.Tensor,
    settings: AlignSettings,
    gen: torch.Generator,
    compute: Compute = CPU,
) -> dict[str, float]:
    """SGD on D_align with the alignment loss, through the same loop as local training."""
    indexed = ImageSet(np.arange(len(align)), align.images, align.files)
    batches = Batches(indexed, dataset, image_size, settings.batch_size, compute)
    loss = AlignLoss(torch.from_numpy(align.labels).to(compute.device), q.to(compute.device), settings)
    plain = TrainSettings(1, settings.lr, 0.0, 0.0, settings.augment)
    stats = train(model, StepBatches(batches, settings.steps), plain, gen, loss, compute=compute)
    return {"align-loss": stats["train-loss"], **loss.means(), "align-steps": stats["local-steps"]}

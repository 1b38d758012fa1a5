"""Classifier calibration baselines: what clients compute (CCVR, CReFF) and what the server does with it.

Both keep the federated backbone and re-train only the linear classifier on the server, on features
that never were client images:

- CCVR (Luo et al., NeurIPS 2021): clients send per-class mean and covariance of the classifier's input
  features under the global model; the server pools them into one Gaussian per class, samples virtual
  features from it and re-trains the classifier on them (class-balanced by construction).
- CReFF (Shang et al., IJCAI 2022): clients send, per class, the gradient of the CE loss w.r.t. the
  global classifier on their real features; the server learns `virtual-per-class` "federated
  features" per class whose classifier gradients match the aggregated real ones (cosine distance per
  output row, as in dataset condensation), then re-trains the classifier on them.

Classifier-input features are `FLModel.embed` (the projection output, `projection-dim` wide).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flcore.uploads import classifier_grad


def pooled_gaussians(uploads: list[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class count, mean and covariance of the union of all clients' features (exact pooling)."""
    counts = sum(np.asarray(u["counts"], np.float64) for u in uploads)
    safe = np.maximum(counts, 1)[:, None]
    means = sum(u["counts"][:, None] * u["means"].astype(np.float64) for u in uploads) / safe
    scatter = sum(
        np.maximum(u["counts"] - 1, 0)[:, None, None] * u["covs"].astype(np.float64)
        + u["counts"][:, None, None] * np.einsum("ci,cj->cij", u["means"], u["means"])
        for u in uploads
    )
    covs = (scatter - counts[:, None, None] * np.einsum("ci,cj->cij", means, means)) / np.maximum(counts - 1, 1)[
        :, None, None
    ]
    return counts, means, covs


def sample_virtual_features(
    counts: np.ndarray, means: np.ndarray, covs: np.ndarray, per_class: int, gen: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` draws from each seen class's Gaussian (covariance made PSD), with their labels."""
    feats, labels = [], []
    for c in np.flatnonzero(counts > 0):
        cov = (covs[c] + covs[c].T) / 2 + 1e-5 * np.eye(len(means[c]))
        feats.append(gen.multivariate_normal(means[c], cov, size=per_class, method="eigh"))
        labels.append(np.full(per_class, c))
    return torch.tensor(np.concatenate(feats), dtype=torch.float32), torch.tensor(np.concatenate(labels))


def retrain_classifier(
    weight: torch.Tensor,
    bias: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    gen: torch.Generator,
    batch_size: int = 32,
    momentum: float = 0.0,
    fresh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD with CE on (virtual or federated) features: from the given classifier, or a fresh one (CReFF)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        head = nn.Linear(weight.shape[1], weight.shape[0])
    if not fresh:
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    feats, labels = feats.detach().float(), labels.long()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.weight.detach(), head.bias.detach()


def match_distance(syn: tuple[torch.Tensor, ...], real: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Dataset-condensation gradient distance: sum over output rows of 1 - cosine similarity."""
    total = torch.zeros((), dtype=syn[0].dtype)
    for s, r in zip(syn, real, strict=True):
        rows = s.shape[0] if s.dim() > 1 else 1  # a bias gradient is one row
        total = total + (1 - F.cosine_similarity(s.reshape(rows, -1), r.reshape(rows, -1), dim=1, eps=1e-6)).sum()
    return total


class FederatedFeatures:
    """CReFF's server state: `per_class` learnable features per class, kept across rounds."""

    def __init__(self, num_classes: int, dim: int, per_class: int, gen: torch.Generator) -> None:
        self.features = torch.randn(num_classes * per_class, dim, generator=gen, dtype=torch.float64)
        self.labels = torch.arange(num_classes).repeat_interleave(per_class)
        self.per_class = per_class

    def match(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        uploads: list[Mapping[str, np.ndarray]],
        epochs: int,
        lr: float,
    ) -> float:
        """Move the features so their classifier gradients match the real ones.

        The real gradient of class c is the plain mean over the clients holding c (as CReFF averages).
        """
        holders = sum((np.asarray(u["counts"]) > 0).astype(np.float64) for u in uploads)
        safe = np.maximum(holders, 1)
        real_w = sum(u["grad-weight"].astype(np.float64) for u in uploads) / safe[:, None, None]
        real_b = sum(u["grad-bias"].astype(np.float64) for u in uploads) / safe[:, None]
        real_w, real_b = torch.tensor(real_w, dtype=torch.float64), torch.tensor(real_b, dtype=torch.float64)
        weight, bias = weight.double(), bias.double()
        feats = self.features.clone().requires_grad_(True)
        opt = torch.optim.SGD([feats], lr=lr)
        seen = [int(c) for c in np.flatnonzero(holders > 0)]
        loss = torch.zeros(())
        for _ in range(epochs):
            loss = torch.zeros((), dtype=torch.float64)
            for c in seen:
                rows = slice(c * self.per_class, (c + 1) * self.per_class)
                syn = classifier_grad(feats[rows], c, weight, bias, create_graph=True)
                loss = loss + match_distance(syn, (real_w[c], real_b[c]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.features = feats.detach()
        return float(loss.detach())

"""CCVR (Luo et al., NeurIPS 2021, "No Fear of Heterogeneity: Classifier Calibration for Federated
Learning with Non-IID Data"): FedAvg, then classifier calibration with virtual representations.

As Luo et al. define it, calibration is post hoc: after the last round the server sends the final
global model to every connected client (`strategies.class_uploads.UploadsAfterAggregation`, one
`query.upload` round trip, no training), and each client returns per-class count, mean and covariance of
the classifier's input features under that model (`flcore.class_statistics.feature_statistics`). The
final model is the one the clients end with: the last aggregate after the server's round stages, so
under `align` the aligned one (the statistics are taken after stage 3, not before it). The server pools
them into one Gaussian per class (`pooled_gaussians`), samples `virtual-per-class` virtual features from
each class seen at least twice (one feature has no covariance), re-trains the classifier on them
(class-balanced by construction) and attaches it to that same backbone. Classifier-input features are
`FLModel.embed`.

Clients send unbiased covariances (n - 1), as the paper defines them, so the pooled covariance is the
exact sample covariance of the union of the clients' features; FL-bench's CCVR pools with the same
formula but its clients send biased ones (n), a departure recorded in docs/stage2-methods.md and
checked against FL-bench's code in tests/test_parity_ccvr.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.class_statistics import Uploads
from flcore.config import Settings
from flcore.device import compute_of
from flcore.server_data import client_classes
from strategies.class_uploads import (
    Calibrate,
    UploadsAfterAggregation,
    classifier,
    retrain_classifier,
    with_classifier,
)
from strategies.fedavg import sampling


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
    """`per_class` draws from the Gaussian (covariance made PSD) of each class with a covariance, i.e. seen at
    least twice (as FL-bench's CCVR), with their labels."""
    feats, labels = [], []
    for c in np.flatnonzero(counts > 1):
        cov = (covs[c] + covs[c].T) / 2 + 1e-5 * np.eye(len(means[c]))
        feats.append(gen.multivariate_normal(means[c], cov, size=per_class, method="eigh"))
        labels.append(np.full(per_class, c))
    return torch.tensor(np.concatenate(feats), dtype=torch.float32), torch.tensor(np.concatenate(labels))


def ccvr_calibrate(cfg: Settings) -> Calibrate:
    """CCVR: pool the clients' class Gaussians, sample virtual features, re-train the classifier."""
    seed = cfg.seed

    def calibrate(rnd: int, arrays: ArrayRecord, uploads: list[Uploads], metrics) -> ArrayRecord:
        counts, means, covs = pooled_gaussians(uploads)
        metrics["calibrated-classes"] = float((counts > 1).sum())
        if not (counts > 1).any():
            return arrays  # no class has a covariance: nothing to sample, the classifier stays
        feats, labels = sample_virtual_features(counts, means, covs, cfg.virtual_per_class, np.random.default_rng(seed))
        weight, bias = retrain_classifier(
            *classifier(arrays),
            feats,
            labels,
            cfg.calibration_epochs,
            cfg.calibration_lr,
            torch.Generator().manual_seed(seed),
            momentum=0.9,
            device=compute_of(cfg).device,
        )
        return with_classifier(arrays, weight, bias)

    return calibrate


def ccvr(cfg: Settings) -> Strategy:
    """FedAvg, then CCVR after the last round's aggregation and stages: class feature statistics of the final
    model, a new head."""
    last = cfg.num_server_rounds
    return UploadsAfterAggregation(
        FedAvg(**sampling(cfg)),
        "feature-stats",
        lambda rnd: rnd == last,
        ccvr_calibrate(cfg),
        timeout=cfg.round_timeout,
        max_upload_mb=cfg.max_upload_mb,
        request_config=client_classes(cfg),
    )

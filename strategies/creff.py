"""CReFF (Shang et al., IJCAI 2022, "Federated Learning on Heterogeneous and Long-Tailed Data via
Classifier Re-Training with Federated Features"), around Flower's FedAvg.

Every round clients send, per class, the gradient of the CE loss w.r.t. the server's re-trained
classifier on their real features (`flcore.class_statistics.class_gradients`); the server learns
`virtual-per-class` "federated features" per class whose classifier gradients match the aggregated real
ones (cosine distance per output row, as in dataset condensation), then re-trains a fresh classifier on
them. The evaluated model is the FedAvg backbone with that classifier; clients keep training the plain
FedAvg model. Classifier-input features are `FLModel.embed` (the projection output).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.class_statistics import Uploads, classifier_grad
from strategies.calibration import WEIGHT, ClientUploads, retrain_classifier, with_classifier
from strategies.fedavg import sampling

# An extra loss on the federated features (features [N, D], labels [N]) added to every matching step.
FeatureTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        extra: FeatureTerm | None = None,
    ) -> float:
        """Move the features so their classifier gradients match the real ones; returns the last distance.

        The real gradient of class c is the plain mean over the clients holding c (as CReFF averages).
        `extra` (CLIP2FL's text contrast) is added to the loss of every step, over all features.
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
        distance = torch.zeros(())
        for _ in range(epochs):
            distance = torch.zeros((), dtype=torch.float64)
            for c in seen:
                rows = slice(c * self.per_class, (c + 1) * self.per_class)
                syn = classifier_grad(feats[rows], c, weight, bias, create_graph=True)
                distance = distance + match_distance(syn, (real_w[c], real_b[c]))
            loss = distance if extra is None else distance + extra(feats, self.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.features = feats.detach()
        return float(distance.detach())


class CReFFServer:
    """CReFF's server state across rounds: the federated features and the classifier re-trained on them.

    Each round clients compute class gradients of the re-trained classifier (`head`, sent with the
    request; a seeded fresh one in round 1) on their backbone features; the server matches the
    federated features to them on that same classifier and re-trains a fresh classifier on the features.
    `extra` is added to the matching loss (CLIP2FL's text contrast); its final value goes to the metrics.
    """

    def __init__(self, cfg: Mapping, extra: FeatureTerm | None = None) -> None:
        self.cfg, self.seed, self.extra = cfg, int(cfg["seed"]), extra
        self.features: FederatedFeatures | None = None
        self.weight = self.bias = torch.empty(0)

    def head(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """The classifier clients compute gradients with; created on first use with the global head's shape."""
        if self.features is None:
            num_classes, dim = arrays[WEIGHT].shape
            gen = torch.Generator().manual_seed(self.seed)
            self.features = FederatedFeatures(num_classes, dim, int(self.cfg["virtual-per-class"]), gen)
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                fresh = torch.nn.Linear(dim, num_classes)
            self.weight, self.bias = fresh.weight.detach(), fresh.bias.detach()
        return {"weight": self.weight.numpy(), "bias": self.bias.numpy()}

    def __call__(
        self, rnd: int, sent: ArrayRecord, arrays: ArrayRecord, uploads: list[Uploads], metrics
    ) -> ArrayRecord:
        cfg = self.cfg
        if self.features is None:
            raise RuntimeError("CReFF calibration ran before any request sent its classifier")
        feats = self.features
        metrics["match-loss"] = feats.match(
            self.weight, self.bias, uploads, int(cfg["match-epochs"]), float(cfg["feature-lr"]), self.extra
        )
        if self.extra is not None:
            with torch.no_grad():
                metrics["contrast-loss"] = float(self.extra(feats.features, feats.labels))
        self.weight, self.bias = retrain_classifier(
            self.weight,
            self.bias,
            self.features.features,
            self.features.labels,
            int(cfg["calibration-epochs"]),
            float(cfg["calibration-lr"]),
            torch.Generator().manual_seed(self.seed + rnd),
            fresh=True,
        )
        return with_classifier(arrays, self.weight, self.bias)


def with_server(cfg: Mapping, server: CReFFServer) -> Strategy:
    """FedAvg whose clients upload class gradients every round for `server`, and train the plain aggregate."""
    return ClientUploads(
        FedAvg(**sampling(cfg)),
        "class-gradients",
        lambda rnd: True,
        server,
        train_on_calibrated=False,
        head=server.head,
    )


def creff(cfg: Mapping) -> Strategy:
    """FedAvg plus CReFF every round: federated features from class gradients; clients train the plain aggregate."""
    return with_server(cfg, CReFFServer(cfg))

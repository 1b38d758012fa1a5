"""CReFF (Shang et al., IJCAI 2022, "Federated Learning on Heterogeneous and Long-Tailed Data via
Classifier Re-Training with Federated Features"), around Flower's FedAvg.

Every round clients send, per class, the gradient of the CE loss w.r.t. the server's re-trained
classifier on their real features, averaged over 10 DSA-augmented draws of up to 32 images as CReFF's
clients do (`flcore.class_statistics.drawn_class_gradients`); the server learns
`virtual-per-class` "federated features" per class whose classifier gradients match the aggregated real
ones (cosine distance per output row, as in dataset condensation), then re-trains a fresh classifier on
them. Classifier-input features are `FLModel.embed`: ResNet-8's 256-d features under CReFF's model
(`head=auto`).

The global model is the evaluated one, the FedAvg backbone with the re-trained classifier; server stages
run on it and their output replaces it. As in CReFF's reference code, the re-trained classifier never
reaches local training: clients train the global backbone with the classifier federated training carries
(the last plain FedAvg aggregate's), and compute their class gradients with the global model's own
classifier (the re-trained one, or what a server stage made of it; a seeded fresh one until the first
re-training). The federated features, the matching (float64) and the re-training live on the run's device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.class_statistics import Uploads, classifier_grad
from flcore.config import Settings
from flcore.device import compute_of
from flcore.progress import progress
from strategies.class_uploads import WEIGHT, ClientUploads, classifier, retrain_classifier, with_classifier
from strategies.fedavg import sampling

# An extra loss on the federated features (features [N, D], labels [N]) added to every matching step.
FeatureTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def match_distance(syn: tuple[torch.Tensor, ...], real: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Dataset-condensation gradient distance, CReFF's `match_loss` ('ours', `distance_wb`): summed over the
    parameters and their output rows, 1 - <s, r> / (|s| |r| + 1e-6); a bias gradient is one row. The 1e-6 is
    added to the product of the norms, as the authors do (not a floor on it, as `F.cosine_similarity` has):
    small client gradients are where the two differ."""
    total = syn[0].new_zeros(())
    for s, r in zip(syn, real, strict=True):
        rows = s.shape[0] if s.dim() > 1 else 1
        s, r = s.reshape(rows, -1), r.reshape(rows, -1)
        total = total + (1 - (s * r).sum(1) / (s.norm(dim=1) * r.norm(dim=1) + 1e-6)).sum()
    return total


class FederatedFeatures:
    """CReFF's server state: `per_class` learnable features per class, kept across rounds."""

    def __init__(self, features: torch.Tensor, per_class: int) -> None:
        self.features, self.per_class = features, per_class
        self.labels = torch.arange(len(features) // per_class, device=features.device).repeat_interleave(per_class)

    @classmethod
    def random(
        cls, num_classes: int, dim: int, per_class: int, gen: torch.Generator, device: torch.device | None = None
    ) -> FederatedFeatures:
        """CReFF's start: standard normal features, drawn on the CPU from `gen` and kept on `device`."""
        features = torch.randn(num_classes * per_class, dim, generator=gen, dtype=torch.float64)
        return cls(features.to(device), per_class)

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
        device = self.features.device
        real_w, real_b = (torch.tensor(r, dtype=torch.float64, device=device) for r in (real_w, real_b))
        weight, bias = weight.to(device, torch.float64), bias.to(device, torch.float64)
        feats = self.features.clone().requires_grad_(True)
        opt = torch.optim.SGD([feats], lr=lr)
        seen = [int(c) for c in np.flatnonzero(holders > 0)]
        distance = torch.zeros((), device=device)
        for _ in progress(range(epochs), desc="creff matching", unit="epoch"):
            distance = torch.zeros((), dtype=torch.float64, device=device)
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
    """CReFF's server state across rounds: the federated features and whether a classifier was re-trained yet.

    Each round clients compute class gradients of the classifier `head` picks (sent with the request) on
    their backbone features; the server matches the federated features to them on that same classifier
    and re-trains a fresh classifier on the features, which `ClientUploads` attaches to the aggregate.
    `extra` is added to the matching loss (CLIP2FL's text contrast); its final value goes to the metrics.
    """

    def __init__(self, cfg: Settings, extra: FeatureTerm | None = None) -> None:
        self.cfg, self.seed, self.extra = cfg, cfg.seed, extra
        self.device = compute_of(cfg).device
        self.features: FederatedFeatures | None = None
        self.retrained = False
        self.weight = self.bias = torch.empty(0)

    def head(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """The classifier this round's class gradients are computed with: the global model's once one was
        re-trained, before that a seeded fresh one (CReFF's start); the features start with the first call."""
        num_classes, dim = arrays[WEIGHT].shape
        if self.features is None:
            gen = torch.Generator().manual_seed(self.seed)
            per_class = self.cfg.virtual_per_class
            self.features = FederatedFeatures.random(num_classes, dim, per_class, gen, self.device)
        if self.retrained:
            self.weight, self.bias = classifier(arrays)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                fresh = torch.nn.Linear(dim, num_classes)
            self.weight, self.bias = fresh.weight.detach(), fresh.bias.detach()
        return {"weight": self.weight.numpy(), "bias": self.bias.numpy()}

    def __call__(self, rnd: int, arrays: ArrayRecord, uploads: list[Uploads], metrics) -> ArrayRecord:
        cfg = self.cfg
        if self.features is None:
            raise RuntimeError("CReFF calibration ran before any request sent its classifier")
        feats = self.features
        metrics["match-loss"] = feats.match(
            self.weight, self.bias, uploads, cfg.match_epochs, cfg.feature_lr, self.extra
        )
        if self.extra is not None:
            with torch.no_grad():
                metrics["contrast-loss"] = float(self.extra(feats.features, feats.labels))
        weight, bias = retrain_classifier(
            self.weight,
            self.bias,
            self.features.features,
            self.features.labels,
            cfg.calibration_epochs,
            cfg.calibration_lr,
            torch.Generator().manual_seed(self.seed + rnd),
            fresh=True,
            device=self.device,
        )
        self.retrained = True
        return with_classifier(arrays, weight, bias)

    def state_dict(self) -> dict:
        """What a resumed run needs (`rounds.checkpoint`): the features and whether a classifier was re-trained."""
        if self.features is None:
            return {"retrained": self.retrained}
        return {"retrained": self.retrained, "features": self.features.features.cpu().clone()}

    def load_state_dict(self, state: Mapping) -> None:
        self.retrained = bool(state["retrained"])
        if "features" in state:
            features = state["features"].to(self.device)
            self.features = FederatedFeatures(features, self.cfg.virtual_per_class)


def with_server(cfg: Settings, server: CReFFServer) -> Strategy:
    """FedAvg whose clients upload class gradients every round for `server`, and train the plain aggregate."""
    return ClientUploads(
        FedAvg(**sampling(cfg)),
        "class-gradients",
        lambda rnd: True,
        server,
        train_on_calibrated=False,
        head=server.head,
    )


def creff(cfg: Settings) -> Strategy:
    """FedAvg plus CReFF every round: federated features from class gradients; clients train the plain aggregate."""
    return with_server(cfg, CReFFServer(cfg))

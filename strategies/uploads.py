"""Strategies whose clients upload more than their weights: CCVR and CReFF, around Flower's FedAvg.

`ClientUploads` holds any strategy and forwards every call to it. In the rounds it asks for them, it
adds `upload = <name>` to the round's train config; each client then computes `CLIENT_UPLOADS[name]`
on the global model it received (before local training) and replies with an extra ConfigRecord
`uploads` of numpy arrays as bytes. FedAvg checks and averages only the ArrayRecord and MetricRecord,
and every sampled client gets the same request, so the reply keys stay identical across clients.
After the inner strategy aggregates, `calibrate` turns the uploads into a new classifier.

What each method uploads and runs on the client is written to the run summary (`describe`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flcore.uploads import HEAD_KEYS, RECORD, UPLOAD_KEY, Uploads, decode, npy_bytes
from strategies.calibration import FederatedFeatures, pooled_gaussians, retrain_classifier, sample_virtual_features
from strategies.delegate import Delegating

WEIGHT, BIAS = "classifier.weight", "classifier.bias"
Calibrate = Callable[[int, ArrayRecord, ArrayRecord, list[Uploads], MetricRecord], ArrayRecord]


class ClientUploads(Delegating):
    """Any strategy, plus client uploads in chosen rounds and a server-side classifier calibration."""

    def __init__(
        self,
        inner: Strategy,
        upload: str,
        in_round: Callable[[int], bool],
        calibrate: Calibrate,
        train_on_calibrated: bool = True,
        head: Callable[[ArrayRecord], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        super().__init__(inner)
        self.upload, self.in_round, self.calibrate = upload, in_round, calibrate
        self.train_on_calibrated, self.head = train_on_calibrated, head
        self.sent: ArrayRecord | None = None
        self.aggregated: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> client uploads '%s' + server classifier calibration", self.upload)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.train_on_calibrated and self.aggregated is not None:
            arrays = self.aggregated  # CReFF: clients keep training the plain aggregate
        self.sent = arrays
        config = ConfigRecord({k: v for k, v in config.items() if k != UPLOAD_KEY})
        if self.in_round(server_round):
            config[UPLOAD_KEY] = self.upload
            for key, value in (self.head(arrays) if self.head else {}).items():
                config[HEAD_KEYS[key]] = npy_bytes(value)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or not self.in_round(server_round):
            return arrays, metrics
        self.aggregated = arrays
        uploads = [decode(r.content[RECORD]) for r in replies if not r.has_error() and RECORD in r.content]
        if not uploads:
            raise RuntimeError(f"round {server_round}: no client sent the '{self.upload}' upload")
        metrics = MetricRecord() if metrics is None else metrics
        return self.calibrate(server_round, self.sent, arrays, uploads, metrics), metrics


def with_classifier(arrays: ArrayRecord, weight: torch.Tensor, bias: torch.Tensor) -> ArrayRecord:
    """`arrays` with the classifier replaced (dtype kept)."""
    new = {WEIGHT: weight, BIAS: bias}
    return ArrayRecord(
        {k: Array(np.asarray(new[k].numpy().astype(v.numpy().dtype))) if k in new else v for k, v in arrays.items()}
    )


def _classifier(arrays: ArrayRecord) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(arrays[WEIGHT].numpy().copy()), torch.from_numpy(arrays[BIAS].numpy().copy())


def ccvr_calibrate(cfg: Mapping) -> Calibrate:
    """CCVR: pool the clients' class Gaussians, sample virtual features, re-train the classifier."""
    seed = int(cfg["seed"])

    def calibrate(rnd: int, sent: ArrayRecord, arrays: ArrayRecord, uploads: list[Uploads], metrics) -> ArrayRecord:
        counts, means, covs = pooled_gaussians(uploads)
        feats, labels = sample_virtual_features(
            counts, means, covs, int(cfg["virtual-per-class"]), np.random.default_rng(seed)
        )
        weight, bias = retrain_classifier(
            *_classifier(arrays),
            feats,
            labels,
            int(cfg["calibration-epochs"]),
            float(cfg["calibration-lr"]),
            torch.Generator().manual_seed(seed),
            momentum=0.9,
        )
        metrics["calibrated-classes"] = float((counts > 0).sum())
        return with_classifier(arrays, weight, bias)

    return calibrate


class CReFFServer:
    """CReFF's server state across rounds: the federated features and the classifier re-trained on them.

    Each round clients compute class gradients of the re-trained classifier (`head`, sent with the
    request; a seeded fresh one in round 1) on their backbone features; the server matches the
    federated features to them on that same classifier, re-trains a fresh classifier on the features,
    and the evaluated model is the FedAvg backbone with it. Clients keep training the plain FedAvg model.
    """

    def __init__(self, cfg: Mapping) -> None:
        self.cfg, self.seed = cfg, int(cfg["seed"])
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
        metrics["match-loss"] = self.features.match(
            self.weight, self.bias, uploads, int(cfg["match-epochs"]), float(cfg["feature-lr"])
        )
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


def describe(cfg: Mapping) -> dict[str, str]:
    """For the run summary: what each client uploads per round and what it runs, for an honest comparison."""
    per_round = "model weights (state dict) + scalar train metrics"
    runs = f"local SGD on its partition with {cfg['loss']} loss"
    strategy = str(cfg["strategy"])
    if strategy == "fedprox":
        runs += f" + FedProx proximal term (mu {cfg['proximal-mu']})"
    if strategy == "ccvr":
        per_round += (
            "; last round also: per-class feature count, mean [C, D] and covariance [C, D, D] under the global model"
        )
        runs += "; last round also a feature pass over its data with the received global model"
    if strategy in ("creff", "clip2fl"):
        per_round += "; every round also: per-class classifier gradients [C, C, D] + [C, C] and class counts"
        runs += "; every round also a feature pass and per-class CE gradients of the global classifier"
    if strategy == "clip2fl":
        runs += (
            f"; CLIP teacher {cfg['align-teacher']} ({cfg['align-pretrained']}) ON THE CLIENT: one zero-shot forward "
            f"over its partition (cached), KD term weight {cfg['kd-weight']} at temperature {cfg['kd-temperature']}"
        )
    return {"client-uploads": per_round, "client-runs": runs}

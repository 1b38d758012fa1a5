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

import io
from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.calibration import (
    FederatedFeatures,
    class_gradients,
    feature_statistics,
    pooled_gaussians,
    retrain_classifier,
    sample_virtual_features,
)

UPLOAD_KEY = "upload"  # train-config key naming the requested upload
RECORD = "uploads"  # reply ConfigRecord holding it
WEIGHT, BIAS = "classifier.weight", "classifier.bias"

Uploads = dict[str, np.ndarray]
Calibrate = Callable[[int, ArrayRecord, ArrayRecord, list[Uploads], MetricRecord], ArrayRecord]

# Client side: upload name -> fn(model, batches, num_classes) -> arrays to send.
CLIENT_UPLOADS: dict[str, Callable] = {"feature-stats": feature_statistics, "class-gradients": class_gradients}


def encode(arrays: Mapping[str, np.ndarray]) -> ConfigRecord:
    """Arrays as `.npy` bytes in a ConfigRecord (Flower allows one ArrayRecord per reply: the model's)."""
    out = {}
    for key, value in arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        out[key] = buf.getvalue()
    return ConfigRecord(out)


def decode(record: ConfigRecord) -> Uploads:
    return {k: np.load(io.BytesIO(v), allow_pickle=False) for k, v in record.items()}


def client_upload(name: str, model: torch.nn.Module, batches, num_classes: int) -> ConfigRecord:
    """What a client sends when the server's round config asks for `name`."""
    if name not in CLIENT_UPLOADS:
        raise ValueError(f"server asked for upload {name!r}; this client knows {', '.join(CLIENT_UPLOADS)}")
    return encode(CLIENT_UPLOADS[name](model, batches, num_classes))


class ClientUploads(Strategy):
    """Any strategy, plus client uploads in chosen rounds and a server-side classifier calibration."""

    def __init__(
        self,
        inner: Strategy,
        upload: str,
        in_round: Callable[[int], bool],
        calibrate: Calibrate,
        train_on_calibrated: bool = True,
    ) -> None:
        self.inner, self.upload, self.in_round, self.calibrate = inner, upload, in_round, calibrate
        self.train_on_calibrated = train_on_calibrated
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

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


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
        )
        metrics["calibrated-classes"] = float((counts > 0).sum())
        return with_classifier(arrays, weight, bias)

    return calibrate


def creff_calibrate(cfg: Mapping) -> Calibrate:
    """CReFF: update the federated features by gradient matching on the sent classifier, re-train on them."""
    seed = int(cfg["seed"])
    state: dict[str, FederatedFeatures] = {}

    def calibrate(rnd: int, sent: ArrayRecord, arrays: ArrayRecord, uploads: list[Uploads], metrics) -> ArrayRecord:
        weight, bias = _classifier(sent)
        if "ff" not in state:
            gen = torch.Generator().manual_seed(seed)
            state["ff"] = FederatedFeatures(weight.shape[0], weight.shape[1], int(cfg["virtual-per-class"]), gen)
        ff = state["ff"]
        metrics["match-loss"] = ff.match(weight, bias, uploads, int(cfg["match-epochs"]), float(cfg["feature-lr"]))
        new_w, new_b = retrain_classifier(
            *_classifier(arrays),
            ff.features,
            ff.labels,
            int(cfg["calibration-epochs"]),
            float(cfg["calibration-lr"]),
            torch.Generator().manual_seed(seed + rnd),
        )
        return with_classifier(arrays, new_w, new_b)

    return calibrate


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
    if strategy == "creff":
        per_round += "; every round also: per-class classifier gradients [C, C, D] + [C, C] and class counts"
        runs += "; every round also a feature pass and per-class CE gradients of the global classifier"
    return {"client-uploads": per_round, "client-runs": runs}

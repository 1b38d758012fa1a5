"""What CCVR and CReFF share on the server: the upload round trip and re-training the classifier.

Both keep the federated backbone and re-train only the linear classifier on the server, on features
that never were client images (`strategies.ccvr`, `strategies.creff`). `ClientUploads` holds any
strategy and forwards every call to it. In the rounds it asks for them, it adds `upload = <name>` to the
round's train config; each client then computes that upload (`flcore.class_statistics`) on the global
model it received, before local training, and replies with an extra ConfigRecord of numpy arrays as
bytes. FedAvg checks and averages only the ArrayRecord and MetricRecord, and every sampled client gets
the same request, so the reply keys stay identical across clients. After the inner strategy
aggregates, `calibrate` turns the uploads into a new classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from flcore.class_statistics import HEAD_KEYS, RECORD, UPLOAD_KEY, Uploads, decode, npy_bytes
from rounds.delegate import Delegating

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


def classifier(arrays: ArrayRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """The global classifier's weight and bias as tensors of their own."""
    return torch.from_numpy(arrays[WEIGHT].numpy().copy()), torch.from_numpy(arrays[BIAS].numpy().copy())


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

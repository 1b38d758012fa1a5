"""Class-statistics uploads, what CCVR and CReFF share on the server: collecting them and re-training the classifier.

Both keep the federated backbone and re-train only the linear classifier on the server, on features
that never were client images (`strategies.ccvr`, `strategies.creff`). Clients compute the uploads
(`flcore.class_statistics`) and send them as an extra ConfigRecord of `.npy` bytes, at one of two
moments, each a wrapper around any strategy:

- `ClientUploads` (CReFF): with the training request of the rounds it asks in (`upload = <name>` in the
  train config); each client computes the upload on the global model it received, before local training.
  FedAvg checks and averages only the ArrayRecord and MetricRecord, and every sampled client gets the
  same request, so the reply keys stay identical across clients.
- `UploadsAfterAggregation` (CCVR): in the rounds it asks in, once the server stages have acted on the
  aggregate (stage 3's alignment; `rounds.delegate.after_stages`), a separate `query.upload` round trip
  sends that model, the one the clients end with, to every connected client, which computes the upload on
  it and trains nothing.

Then `calibrate` turns the uploads into a new classifier on that backbone, on the run's device
(`flcore.device`); the new classifier comes back to the CPU where it becomes Flower arrays (`with_classifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from flcore.arrays import reply_metrics
from flcore.class_statistics import HEAD_KEYS, RECORD, UPLOAD_ACTION, UPLOAD_KEY, Uploads, decode, npy_bytes
from flcore.progress import progress
from rounds.delegate import AsksEveryNode, Delegating
from rounds.guard import screen

WEIGHT, BIAS = "classifier.weight", "classifier.bias"
Calibrate = Callable[[int, ArrayRecord, list[Uploads], MetricRecord], ArrayRecord]


class ClassUploads(Delegating):
    """What both upload wrappers hold: the upload's name, the rounds that carry it and the calibration the
    server runs on what comes back."""

    summary_text = "client uploads '%s' + server classifier calibration"

    def __init__(self, inner: Strategy, upload: str, in_round: Callable[[int], bool], calibrate: Calibrate) -> None:
        super().__init__(inner)
        self.upload, self.in_round, self.calibrate = upload, in_round, calibrate

    def summary(self) -> None:
        log(INFO, "\t├──> " + self.summary_text, self.upload)
        self.inner.summary()


class ClientUploads(ClassUploads):
    """Any strategy, plus uploads with the training request of chosen rounds and a classifier calibration.

    With `train_on_calibrated=False` (CReFF) the calibrated classifier stays on the server: clients train
    the global model with the classifier federated training carries (the last plain aggregate's) in
    place of the global one, and `head` picks, from the global model, the classifier their uploads are
    computed with.
    """

    def __init__(
        self,
        inner: Strategy,
        upload: str,
        in_round: Callable[[int], bool],
        calibrate: Calibrate,
        train_on_calibrated: bool = True,
        head: Callable[[ArrayRecord], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        super().__init__(inner, upload, in_round, calibrate)
        self.train_on_calibrated, self.head = train_on_calibrated, head
        self.trained_classifier: ArrayRecord | None = None  # the last plain aggregate's (train_on_calibrated=False)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({k: v for k, v in config.items() if k != UPLOAD_KEY})
        if self.in_round(server_round):
            config[UPLOAD_KEY] = self.upload
            for key, value in (self.head(arrays) if self.head else {}).items():
                config[HEAD_KEYS[key]] = npy_bytes(value)
        if not self.train_on_calibrated and self.trained_classifier is not None:
            arrays = with_classifier(arrays, *classifier(self.trained_classifier))
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        if not self.train_on_calibrated:
            self.trained_classifier = ArrayRecord({WEIGHT: arrays[WEIGHT], BIAS: arrays[BIAS]})
        if not self.in_round(server_round):
            return arrays, metrics
        uploads = [decode(r.content[RECORD]) for r in replies if not r.has_error() and RECORD in r.content]
        if not uploads:
            raise RuntimeError(f"round {server_round}: no client sent the '{self.upload}' upload")
        metrics = MetricRecord() if metrics is None else metrics
        return self.calibrate(server_round, arrays, uploads, metrics), metrics


class UploadsAfterAggregation(ClassUploads, AsksEveryNode):
    """Any strategy, plus, after the aggregation of chosen rounds, an upload-only round trip and a calibration.

    Both run in `after_stages`, on the model the server stages made of the aggregate (the aligned one under
    `align`; the bare aggregate without stages), so the statistics describe the backbone the calibrated
    classifier is attached to. That model goes to every connected client in a `query.upload` message; each
    computes the upload on it without training. Replies are screened like training replies (failed, non-finite or
    misshapen uploads are left out) and taken in node order (partition order under the round policy),
    so the calibration does not depend on arrival order. Its metrics `<upload>-replies`,
    `<upload>-failed`, `<upload>-rejected` and `<upload>-bytes` (mean per reply) join the round's.
    """

    def __init__(
        self,
        inner: Strategy,
        upload: str,
        in_round: Callable[[int], bool],
        calibrate: Calibrate,
        timeout: float,
        max_upload_mb: float,
        request_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(inner, upload, in_round, calibrate)
        self.timeout = timeout
        self.max_upload_mb = max_upload_mb
        self.request_config = dict(request_config or {})  # what every request carries (nodes' own data: classes)

    summary_text = "'%s' of the final model from every client + server classifier calibration"

    def after_stages(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> ArrayRecord:
        arrays = super().after_stages(server_round, arrays, metrics)
        if not self.in_round(server_round):
            return arrays
        return self.calibrate(server_round, arrays, self._collect(server_round, arrays, metrics), metrics)

    def _collect(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> list[Uploads]:
        """Every connected client's upload computed on `arrays`, screened, in node order; counts in `metrics`."""
        replies, asked = self._ask(server_round, arrays)
        checked = screen(replies, None, self.max_upload_mb, with_model=False)
        sizes = [reply_metrics(r.content).get("upload-bytes", 0.0) for r in checked.accepted]
        metrics[f"{self.upload}-replies"] = len(checked.accepted)
        metrics[f"{self.upload}-failed"] = len(checked.failed) + asked - len(replies)
        metrics[f"{self.upload}-rejected"] = len(checked.rejected)
        metrics[f"{self.upload}-bytes"] = float(np.mean(sizes)) if sizes else 0.0
        if not checked.accepted:
            raise RuntimeError(
                f"round {server_round}: no client sent the '{self.upload}' upload of the aggregated model"
            )
        if len(checked.accepted) < asked:
            log(
                WARNING, "round %s: '%s' from %d of %d clients", server_round, self.upload, len(checked.accepted), asked
            )
        return [decode(r.content[RECORD]) for r in checked.accepted]

    def _ask(self, server_round: int, arrays: ArrayRecord) -> tuple[list[Message], int]:
        """Send `arrays` with the upload request to every connected node: the replies in node order, and how
        many nodes were asked."""
        config = ConfigRecord({**self.request_config, UPLOAD_KEY: self.upload, "server-round": server_round})
        return self.ask_every_node(arrays, config, UPLOAD_ACTION, self.timeout)


def with_classifier(arrays: ArrayRecord, weight: torch.Tensor, bias: torch.Tensor) -> ArrayRecord:
    """`arrays` with the classifier replaced (dtype kept)."""
    new = {WEIGHT: weight.detach().cpu().numpy(), BIAS: bias.detach().cpu().numpy()}
    return ArrayRecord(
        {k: Array(np.asarray(new[k].astype(v.numpy().dtype))) if k in new else v for k, v in arrays.items()}
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
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD with CE on (virtual or federated) features: from the given classifier, or a fresh one (CReFF).

    The fresh classifier and the order of every epoch are drawn on the CPU from `gen`, then the training runs
    on `device` (the features' own by default); a long one shows its epochs and time left."""
    device = feats.device if device is None else device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        head = nn.Linear(weight.shape[1], weight.shape[0])
    head.to(device)
    if not fresh:
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    feats, labels = feats.detach().to(device, torch.float32), labels.to(device, torch.long)
    for _ in progress(range(epochs), desc="classifier calibration", unit="epoch"):
        order = torch.randperm(len(labels), generator=gen).to(device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.weight.detach(), head.bias.detach()

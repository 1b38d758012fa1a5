"""Personalised accuracy after federated training: the methods that fine-tune the final model on each client
(FedETF) report it next to the global model's accuracy.

After the last round's aggregation and server stages (`rounds.delegate.after_stages`, so under `align` the
aligned model, the one the clients end with) the server sends that model to every connected client in a
`query.personalize` message; each fine-tunes it the method's own way (`flcore.personalize`) and sends back the
result with its images per class. The server scores every personalised model on its balanced test split, each
class's accuracy weighted by that client's share of the class: the accuracy on a test set drawn with the
client's own class distribution, which is how FedETF's (a held-out 30 % of each client's data) and FedLoGe's
(test images sampled by each client's distribution) personalised accuracies are meant. The global model does not
change: `personalized-accuracy` (the mean over clients), `personalized-accuracies` (per client, node order),
`personalized-replies` and `personalized-failed` join the last round's metrics; the table's column stays the
global model's accuracy.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from flcore.arrays import reply_metrics
from flcore.batches import Batches
from flcore.config import Settings
from flcore.device import compute_of
from flcore.local_data import CLASS_COUNTS_KEY
from flcore.metrics import confusion_matrix
from flcore.personalize import PERSONALIZE_ACTION
from flcore.run_model import model_from
from flcore.server_data import client_classes, server_data
from flcore.training import predict
from rounds.delegate import AsksEveryNode
from rounds.guard import screen


def personal_accuracy(preds: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> float:
    """Per-class test accuracy weighted by the client's class shares (classes absent from the test split left out)."""
    cm = confusion_matrix(preds, labels, len(counts))
    support = cm.sum(1)
    present = support > 0
    recall = np.divide(np.diag(cm), support, out=np.zeros(len(counts)), where=present)
    weights = np.where(present, np.asarray(counts, np.float64), 0.0)
    return float((weights * recall).sum() / weights.sum()) if weights.sum() > 0 else float("nan")


class Personalization(AsksEveryNode):
    """Any strategy, plus the clients' personalisation of the final model, scored on the server (module doc)."""

    def __init__(self, inner: Strategy, cfg: Settings, enabled: bool = True) -> None:
        super().__init__(inner)
        self.cfg, self.enabled = cfg, enabled
        self.last = cfg.num_server_rounds
        self._test: Batches | None = None

    def summary(self) -> None:
        if self.enabled:
            log(INFO, "\t├──> after the last round: every client personalises the final model, scored on the server")
        self.inner.summary()

    def after_stages(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> ArrayRecord:
        arrays = super().after_stages(server_round, arrays, metrics)
        if self.enabled and server_round == self.last:
            self._score(server_round, arrays, metrics)
        return arrays

    def _score(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> None:
        config = ConfigRecord({**client_classes(self.cfg), "server-round": server_round})
        replies, asked = self.ask_every_node(arrays, config, PERSONALIZE_ACTION, self.cfg.round_timeout)
        checked = screen(replies, arrays, self.cfg.max_upload_mb)
        scores = [self._accuracy(reply) for reply in checked.accepted]
        metrics["personalized-replies"] = len(scores)
        metrics["personalized-failed"] = asked - len(scores)
        if len(scores) < asked:
            log(WARNING, "round %s: personalised models from %d of %d clients", server_round, len(scores), asked)
        if scores:
            metrics["personalized-accuracy"] = float(np.mean(scores))
            metrics["personalized-accuracies"] = scores

    def _accuracy(self, reply: Message) -> float:
        """The personalised model's test accuracy under its client's class distribution."""
        if self._test is None:
            self._test = server_data(self.cfg).test
        counts = np.asarray(reply_metrics(reply.content)[CLASS_COUNTS_KEY], np.float64)
        preds, labels = predict(model_from(self.cfg, reply.content["arrays"]), self._test, compute_of(self.cfg))
        return personal_accuracy(preds, labels, counts)

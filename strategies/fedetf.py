"""FedETF (Li et al., ICCV 2023, "No Fear of Classifier Biases: Neural Collapse Inspired Federated Learning with
Synthetic and Fixed Classifier"; code github:ZexiLee/ICCV-2023-FedETF): FedAvg over a model whose classifier is a
fixed simplex ETF.

The model is the run's backbone and head with `flcore.models.ETFClassifier` in place of the linear classifier: a
learnable projection of the classifier's input to C dimensions, L2-normalised, times a fixed simplex ETF and a
learnable scale. Every client starts from the same ETF (a buffer of the global model) and trains with the
balanced softmax of its own label counts (`flcore.losses.balanced_softmax_loss`), which this wrapper names in
every round's train config (`loss = balanced-softmax`). The server averages as FedAvg does; the ETF, identical in
every reply, stays fixed. Under `align` and `pretrain` the server stages act on that same model: stage 1 hands
over the backbone (and projection), stage 3 fine-tunes the backbone, head, the ETF classifier's projection and
its scale against the teacher, never the ETF itself.

After the last round every client fine-tunes the final model as FedETF's `Client_personalization` does
(`flcore.personalize.fedetf_personalize`: a local update, then `fedetf-finetune-rounds` alternations of the ETF
and the projection) and the server scores each personalised model (`strategies.personalization`):
`personalized-accuracy` in the last round's metrics; `fedetf-finetune-rounds=0` skips it.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.config import Settings
from flcore.losses import LOSS_KEY
from rounds.delegate import Delegating
from strategies.fedavg import sampling
from strategies.personalization import Personalization

BALANCED_SOFTMAX = "balanced-softmax"  # flcore.losses.SERVER_LOSSES


class ClientLoss(Delegating):
    """Any strategy whose clients train with the server loss `loss` (`flcore.losses.SERVER_LOSSES`), named in
    every round's train config."""

    def __init__(self, inner: Strategy, loss: str) -> None:
        super().__init__(inner)
        self.loss = loss

    def summary(self) -> None:
        log(INFO, "\t├──> clients train with the '%s' loss", self.loss)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, ConfigRecord({**config, LOSS_KEY: self.loss}), grid)


def fedetf(cfg: Settings) -> Strategy:
    """FedAvg whose clients train the ETF-classifier model (`flcore.models.METHOD_CLASSIFIERS`) with the balanced
    softmax, and personalise the final model."""
    enabled = cfg.fedetf_finetune_rounds > 0
    return Personalization(ClientLoss(FedAvg(**sampling(cfg)), BALANCED_SOFTMAX), cfg, enabled)

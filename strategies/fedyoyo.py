"""FedYoYo (arXiv 2503.06916, 2025; code github:shanss132/FedYoYo, `main_fedyoyo.py`): FedAvg whose clients train on
a weak and a strong view with a logit adjustment and self-distillation (`flcore.yoyo`), against a class prior the
server keeps from the clients' effective numbers.

Every round, once the round's clients are sampled and before they train, the server sends each of them the global
model in a `query.effective_numbers` message; each answers with its C effective numbers under that model
(`flcore.yoyo.effective_numbers`), and trains nothing. The server adds them up with one image per class
(`round_effective`: the authors' `torch.ones` start), keeps their EMA (`update_effective`) and sends the
normalised EMA as the prior (`yoyo-prior`) with the training request, which also names the clients' loss
(`loss = fedyoyo`). Then FedAvg aggregates the weights. A client uploads its weights and its C effective numbers per
round, nothing else; its label counts stay with it.

Under `align` and `pretrain` the server stages act on the same model: the clients' effective numbers are those of
the model they receive (after stage 1, after stage 3's alignment of the previous aggregate).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from flcore.arrays import reply_metrics
from flcore.config import Settings
from flcore.seeding import kept_random
from flcore.yoyo import EFFECTIVE_ACTION, EFFECTIVE_KEY, PRIOR_KEY, YOYO_LOSS
from rounds.delegate import Delegating
from rounds.guard import screen
from rounds.sampling import with_config
from strategies.fedavg import sampling

EMA = 0.9  # FedYoYo(): eff_global_pre * 0.9 + eff_global_cur * 0.1
CHANGE_THRESHOLD = 100.0  # apply_change_threshold(..., 100): a class whose EMA moves by more keeps its old value
ABNORMAL = 1e4  # round 1: a class above this takes the mean of the others
CHANGE_EPS = 1e-8  # apply_change_threshold's epsilon


def round_effective(uploads: Iterable[np.ndarray], classes: int) -> np.ndarray:
    """One per class plus the sum of this round's clients' effective numbers (float32, as the authors')."""
    total = np.ones(classes, np.float32)
    for upload in uploads:
        total = total + np.asarray(upload, np.float32)
    return total


def update_effective(previous: np.ndarray | None, current: np.ndarray) -> np.ndarray:
    """The server's effective numbers after a round: in the first, `current` with every value above `ABNORMAL`
    replaced by the mean of the others (all of them above it: all ones, which the authors' code leaves as NaN);
    after it, 0.9 previous + 0.1 current, except for classes whose relative change exceeds `CHANGE_THRESHOLD`, which
    keep their previous value."""
    current = np.asarray(current, np.float32)
    if previous is None:
        abnormal = current > ABNORMAL
        fill = current[~abnormal].mean() if (~abnormal).any() else np.float32(1.0)
        return np.where(abnormal, fill, current).astype(np.float32)
    previous = np.asarray(previous, np.float32)
    blended = (previous * np.float32(EMA) + current * np.float32(1 - EMA)).astype(np.float32)
    change = np.abs((blended - previous) / (previous + np.float32(CHANGE_EPS)))
    return np.where(change > CHANGE_THRESHOLD, previous, blended).astype(np.float32)


def class_prior(effective: np.ndarray) -> np.ndarray:
    """The prior the clients adjust their logits with: the effective numbers normalised to sum to one."""
    return (effective / effective.sum()).astype(np.float32)


class EffectivePrior(Delegating):
    """Any strategy whose sampled clients first report their effective numbers under the model they are sent, and
    then train with FedYoYo's loss against the prior the server keeps from them (module doc). `effective` is the
    server's state (saved in checkpoints); `prior` the one this round's clients train with."""

    def __init__(self, inner: Strategy, timeout: float, max_upload_mb: float) -> None:
        super().__init__(inner)
        self.timeout, self.max_upload_mb = timeout, max_upload_mb
        self.effective: np.ndarray | None = None
        self.prior: np.ndarray | None = None
        self.reported = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server's effective numbers, which a checkpoint keeps so a resumed run goes on with the same EMA (the
        inner FedAvg keeps nothing)."""
        return {} if self.effective is None else {"effective": torch.from_numpy(self.effective.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.effective = state["effective"].numpy().astype(np.float32) if "effective" in state else None

    def summary(self) -> None:
        log(INFO, "\t├──> FedYoYo: sampled clients report effective numbers; the server's EMA prior goes to training")
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        classes = len(arrays["classifier.bias"].numpy())
        uploads = self._ask(server_round, messages, arrays, grid, classes)
        self.effective = update_effective(self.effective, round_effective(uploads, classes))
        self.prior, self.reported = class_prior(self.effective), len(uploads)
        entries = {"loss": YOYO_LOSS, PRIOR_KEY: [float(p) for p in self.prior]}
        return [with_config(message, entries) for message in messages]

    def _ask(
        self, server_round: int, messages: list[Message], arrays: ArrayRecord, grid: Grid, classes: int
    ) -> list[np.ndarray]:
        """The effective numbers of the clients `messages` go to, under `arrays`; replies that fail or are not C
        finite non-negative numbers are left out."""
        config = ConfigRecord(dict(messages[0].content.config_records.get("config", {})))  # the round, class names
        content = RecordDict({"arrays": arrays, "config": config})
        queries = [
            Message(content, dst_node_id=m.metadata.dst_node_id, message_type=f"query.{EFFECTIVE_ACTION}")
            for m in messages
        ]
        with kept_random():
            replies = list(grid.send_and_receive(queries, timeout=self.timeout))
        checked = screen(replies, None, self.max_upload_mb, with_model=False)
        uploads = [u for u in (effective_of(r, classes) for r in checked.accepted) if u is not None]
        if len(uploads) < len(queries):
            log(WARNING, "round %s: effective numbers from %d of %d clients", server_round, len(uploads), len(queries))
        return uploads

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        metrics = MetricRecord() if metrics is None else metrics
        if self.prior is not None:
            metrics["yoyo-prior"] = [float(p) for p in self.prior]
            metrics["yoyo-effective-replies"] = self.reported
        return arrays, metrics


def effective_of(reply: Message, classes: int) -> np.ndarray | None:
    """A reply's effective numbers, or None (with a warning) unless they are C finite non-negative numbers."""
    values = reply_metrics(reply.content).get(EFFECTIVE_KEY)
    upload = np.asarray(values if isinstance(values, list) else [], np.float64)
    if upload.shape != (classes,) or not np.isfinite(upload).all() or (upload < 0).any():
        log(WARNING, "a client's '%s' is not %d finite non-negative numbers; left out", EFFECTIVE_KEY, classes)
        return None
    return upload.astype(np.float32)


def fedyoyo(cfg: Settings) -> Strategy:
    """FedAvg whose clients train with FedYoYo's two views, prior and self-distillation (module doc)."""
    return EffectivePrior(FedAvg(**sampling(cfg)), cfg.round_timeout, cfg.max_upload_mb)

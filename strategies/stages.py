"""Server stages around any Flower strategy, by composition.

`ServerStages` holds a Message-API strategy and forwards every call to it unchanged (sampling,
aggregation, its metrics). It adds two hooks the paper needs: stages that transform the initial
global model before round 1 (stage 1, pretraining) and stages that run on the aggregated model right
after each aggregation (stage 3, alignment; reporting). What a stage returns becomes the next global
model.

It also makes the run robust and resumable: replies are screened (`strategies/guard.py`) so failed,
non-finite or malformed updates are never averaged and a round needs only `min_replies` good ones;
nodes are sampled by (seed, round) in partition order (`strategies/sampling.py`); and `round_offset`
lets a resumed run continue at the round after its checkpoint, with clients, stages and evaluation
seeing the original round numbers, while `on_round_end` saves the state after every round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from strategies.delegate import Delegating
from strategies.guard import Screened, screen
from strategies.polling import PromptGrid
from strategies.sampling import NodeOrder, OrderedGrid, seeded_random

InitialStage = Callable[[ArrayRecord], ArrayRecord]
RoundStage = Callable[[int, ArrayRecord, MetricRecord], ArrayRecord]
RoundEnd = Callable[[int, ArrayRecord], None]


@dataclass
class ServerContext:
    """What a server stage may use: the config, the server's data, the model factory and the report.

    `data` is `flcore.experiment.ServerData` (test split, D_align, class groups), `new_model()` builds a
    fresh `FLModel` for this run, `evaluate(arrays)` returns the centralized test metrics of any weights,
    and `report` is the run's `RunReport` (its `dir` receives extra files). Entries a stage puts in
    `summary` are added to the run's summary.json.
    """

    cfg: Mapping[str, Any]
    data: Any
    new_model: Callable[[], Any]
    evaluate: Callable[[ArrayRecord], dict]
    report: Any
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stages:
    """The stages one server-stage factory contributes."""

    before_training: list[InitialStage] = field(default_factory=list)
    after_aggregation: list[RoundStage] = field(default_factory=list)


class ServerStages(Delegating):
    """Any strategy plus server-side stages before round 1 and after each aggregation."""

    def __init__(
        self,
        inner: Strategy,
        before_training: Sequence[InitialStage] = (),
        after_aggregation: Sequence[RoundStage] = (),
        *,
        min_replies: int = 1,
        max_empty_rounds: int = 0,
        seed: int = 0,
        round_offset: int = 0,
        on_round_end: RoundEnd | None = None,
        query_timeout: float = 60.0,
    ) -> None:
        super().__init__(inner)
        self.before_training = list(before_training)
        self.after_aggregation = list(after_aggregation)
        self.min_replies, self.seed, self.round_offset = min_replies, seed, round_offset
        self.max_empty_rounds, self._empty_rounds = max_empty_rounds, 0
        self.on_round_end = on_round_end
        self.nodes = NodeOrder(query_timeout)
        self._sent: int | None = None
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        with seeded_random(self.seed, server_round):
            messages = list(self.inner.configure_train(server_round, arrays, config, OrderedGrid(grid, self.nodes)))
        self._sent, self._global = len(messages), arrays
        self._stop_waiting_for_lost_nodes()
        picked = sorted(self.nodes.key(m.metadata.dst_node_id) for m in messages)
        log(
            INFO,
            "round %s: sampled partitions %s",
            server_round,
            [k[1] if k[0] == 0 else f"node {k[1]}" for k in picked],
        )
        return messages

    def _stop_waiting_for_lost_nodes(self) -> None:
        """After the first round, sample from whoever is online instead of waiting for every node.

        Flower strategies wait (without timeout) until `min_available_nodes` are connected before sampling;
        the registry sets it to num-clients so round 1 starts with the full federation, but a node lost for
        good would then block every later round. `min_replies` nodes are enough from then on.
        """
        if getattr(self.inner, "min_available_nodes", 0) > self.min_replies:
            self.inner.min_available_nodes = self.min_replies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        checked = screen(replies, self._global)
        missing = max(0, (self._sent or len(replies)) - len(replies))  # timed out or dropped: no reply at all
        counts = {
            "replies": len(checked.accepted),
            "rejected": len(checked.rejected),
            "failed": len(checked.failed) + missing,
        }
        self._stop_if_nothing_arrives(checked)
        if len(checked.accepted) < self.min_replies:
            log(
                WARNING,
                "round %s: %s valid replies, fewer than min-replies=%s; the global model stays as it was (%s)",
                server_round,
                len(checked.accepted),
                self.min_replies,
                counts,
            )
            return None, MetricRecord(counts)
        arrays, metrics = self.inner.aggregate_train(server_round, self.nodes.sort_replies(checked.accepted))
        if arrays is None:
            return None, metrics
        metrics = MetricRecord() if metrics is None else metrics
        for key, value in counts.items():
            metrics[key] = value
        for stage in self.after_aggregation:
            arrays = stage(server_round, arrays, metrics)
        return arrays, metrics

    def _stop_if_nothing_arrives(self, checked: Screened) -> None:
        """A fault that hits every client (a bad setting, a rejected message) would otherwise let the run
        finish round after round with the initial model and look like a result."""
        self._empty_rounds = 0 if checked.accepted else self._empty_rounds + 1
        if self.max_empty_rounds and self._empty_rounds >= self.max_empty_rounds:
            reasons = [reason for _, reason in checked.failed + checked.rejected] or ["no reply arrived"]
            raise RuntimeError(
                f"{self._empty_rounds} rounds in a row without one valid client update (max-empty-rounds="
                f"{self.max_empty_rounds}); last round's first problem: {reasons[0]}"
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        *args,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        **kwargs,
    ) -> Result:
        """Run the remaining rounds; a resumed run (round_offset > 0) skips the initial stages and evaluation."""
        if not self.round_offset:
            for stage in self.before_training:
                initial_arrays = stage(initial_arrays)
        return super().start(
            PromptGrid(grid), initial_arrays, *args, evaluate_fn=self._round_end(evaluate_fn), **kwargs
        )

    def _round_end(self, evaluate_fn: Callable | None) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """Flower's evaluate_fn runs last in each round: evaluate at the true round, then save the state."""

        def end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and self.round_offset:
                return None
            result = evaluate_fn(server_round + self.round_offset, arrays) if evaluate_fn else None
            if server_round and self.on_round_end is not None:
                self.on_round_end(server_round + self.round_offset, arrays)
            return result

        return end

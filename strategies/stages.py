"""Server stages around any Flower strategy, by composition.

`ServerStages` holds a Message-API strategy and forwards every call to it unchanged (sampling,
aggregation, its metrics). It adds two hooks the paper needs: stages that transform the initial
global model before round 1 (stage 1, pretraining) and stages that run on the aggregated model right
after each aggregation (stage 3, alignment; reporting). What a stage returns becomes the next global
model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from strategies.polling import PromptGrid

InitialStage = Callable[[ArrayRecord], ArrayRecord]
RoundStage = Callable[[int, ArrayRecord, MetricRecord], ArrayRecord]


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


class ServerStages(Strategy):
    """Any strategy plus server-side stages before round 1 and after each aggregation."""

    def __init__(
        self,
        inner: Strategy,
        before_training: Sequence[InitialStage] = (),
        after_aggregation: Sequence[RoundStage] = (),
    ) -> None:
        self.inner = inner
        self.before_training = list(before_training)
        self.after_aggregation = list(after_aggregation)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        metrics = MetricRecord() if metrics is None else metrics
        metrics["replies"] = sum(not r.has_error() for r in replies)
        for stage in self.after_aggregation:
            arrays = stage(server_round, arrays, metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args, **kwargs) -> Result:
        for stage in self.before_training:
            initial_arrays = stage(initial_arrays)
        return super().start(PromptGrid(grid), initial_arrays, *args, **kwargs)

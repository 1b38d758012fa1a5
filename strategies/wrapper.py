"""The strategy the ServerApp runs: any Flower strategy plus the paper's server stages, by composition.

`ServerStages` holds a strategy (the training method inside `rounds.policy.RoundPolicy`) and forwards
every call to it unchanged. It adds the two hooks the paper needs: stages that transform the initial
global model before round 1 (stage 1, pretraining) and stages that run on the aggregated model right
after each aggregation (stage 3, alignment). Then the method's own step on the model those stages made
(`rounds.delegate.after_stages`: CCVR's class statistics, which must come from the model the clients
end with, aligned or not, and its calibration), then the post-hoc stages (tau-norm). What the last of
them returns becomes the next global model for every strategy: Flower sends it to the next round's
clients, and `adopt` hands it down the strategy chain as the base of the strategy's own update.
What a stage measured goes to the run report, with each round's client metrics.
Every stage's weights, and the method's own step's, pass one check here: a model with NaN or Inf stops
the run with the step's name (`StageError`) instead of becoming the global model. Finite weights can
still give NaN logits (a negative BatchNorm running variance, say); the evaluation refuses those
(`rounds.stage.NonFiniteModel`), and the wrapper, which knows which step made the current global model
(the initial model, a stage before round 1, the resumed checkpoint, the strategy's aggregation, a stage
or the method's step after it), stops the run with the round and that step (`BrokenModel`): such a model
is never scored, written to metrics.jsonl or checkpointed.

Each round's metrics also say where its time went, measured here because only the outermost strategy
sees the whole round: `train-wait-seconds` (from handing the train messages to Flower until the replies
are in: client training plus messaging), `aggregate-seconds` (the strategy's aggregation) and
`stage-seconds` (every after-aggregation stage together, model loading and its evaluations included,
and the method's own step after them: CCVR's upload round trip and calibration).

For resume, `round_offset` lets a continued run start at the round after its checkpoint, with clients,
stages and evaluation seeing the original round numbers, and `on_round_end` saves the state after each
round's evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flcore.arrays import non_finite
from rounds.delegate import Delegating, adopt, after_stages
from rounds.polling import PromptGrid
from rounds.stage import NonFiniteModel, Outcome, Stages

RoundEnd = Callable[[int, ArrayRecord], None]


class StageError(RuntimeError):
    """A server stage produced weights the server must not adopt."""


class BrokenModel(RuntimeError):
    """Evaluation met a global model with NaN or Inf weights or logits; the message names the round and the
    step that made it."""


def stage_name(stage: Callable) -> str:
    """The name a stage is defined under (its factory for closures), for error messages."""
    return getattr(stage, "__qualname__", type(stage).__qualname__).split(".<locals>")[0]


class Report(Protocol):
    """The part of `flcore.reports.RunReport` the wrapper writes to."""

    def record_train(self, server_round: int, metrics: MetricRecord) -> None: ...

    def record_nodes(self, server_round: int, nodes: dict) -> None: ...

    def take(self, outcome: Outcome) -> None: ...


class ServerStages(Delegating):
    """Any strategy plus server-side stages before round 1 and after each aggregation (around the method's
    own step on their result)."""

    def __init__(
        self,
        inner: Strategy,
        stages: Stages,
        report: Report,
        *,
        round_offset: int = 0,
        on_round_end: RoundEnd | None = None,
        method: str = "the strategy",
    ) -> None:
        super().__init__(inner)
        self.stages, self.report = stages, report
        self.round_offset, self.on_round_end = round_offset, on_round_end
        self.method = method
        self.made_by = "the initial model"  # the step that made the current global model, for BrokenModel
        self._sent = time.perf_counter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)
        self._sent = time.perf_counter()  # Flower sends them and waits for the replies next
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        received = time.perf_counter()
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        aggregated = time.perf_counter()
        metrics = MetricRecord() if metrics is None else metrics
        if arrays is not None:
            self.made_by = f"aggregation by {self.method}"
            for stage in self.stages.after_aggregation:
                arrays = self._run(server_round, stage, arrays, metrics)
            stepped = after_stages(self.inner, server_round, arrays, metrics)
            if stepped is not arrays:
                self.made_by = f"{self.method}'s step after the stages"
                arrays = self._take(after_stages, Outcome(stepped))
            for stage in self.stages.post_hoc:
                arrays = self._run(server_round, stage, arrays, metrics)
            adopt(self.inner, arrays)
        metrics["train-wait-seconds"] = received - self._sent
        metrics["aggregate-seconds"] = aggregated - received
        metrics["stage-seconds"] = time.perf_counter() - aggregated
        self.report.record_train(server_round, metrics)
        return arrays, metrics

    def _run(
        self, server_round: int, stage: Callable, arrays: ArrayRecord, metrics: MetricRecord | None = None
    ) -> ArrayRecord:
        """One stage on the global model (a stage before round 1 without `metrics`); a model it evaluates and
        finds broken stops the run, with the step that made that model."""
        try:
            outcome = stage(arrays) if metrics is None else stage(server_round, arrays, metrics)
        except NonFiniteModel as err:  # its input, or a model the stage made
            made_by = self.made_by if err.arrays is arrays else f"stage {stage_name(stage)}"
            raise self._broken(server_round, made_by, err) from err
        if outcome.arrays is not arrays:
            self.made_by = f"stage {stage_name(stage)}"
        return self._take(stage, outcome)

    @staticmethod
    def _broken(server_round: int, made_by: str, err: NonFiniteModel) -> BrokenModel:
        return BrokenModel(
            f"round {server_round}: the global model made by {made_by} cannot be scored: {err.problem}; the "
            "run stops without recording an accuracy for it"
        )

    def _take(self, stage: Callable, outcome: Outcome) -> ArrayRecord:
        """The stage's weights, once they are known to be finite: a NaN model is never adopted or sent out."""
        bad = non_finite(outcome.arrays)
        if bad:
            raise StageError(
                f"server stage {stage_name(stage)} returned a model with NaN or Inf in {bad[:3]} ({len(bad)} of "
                f"{len(outcome.arrays)} arrays); the run stops instead of adopting it"
            )
        self.report.take(outcome)
        return outcome.arrays

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
        self.report.take(Outcome(initial_arrays, self.stages.sections))
        if self.round_offset:
            self.made_by = f"the resumed checkpoint (round {self.round_offset})"
        else:
            for stage in self.stages.before_training:
                initial_arrays = self._run(0, stage, initial_arrays)
        return super().start(
            PromptGrid(grid), initial_arrays, *args, evaluate_fn=self._round_end(evaluate_fn), **kwargs
        )

    def _round_end(self, evaluate_fn: Callable | None) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """Flower's evaluate_fn runs last in each round: evaluate at the true round, then save the state."""

        def end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and self.round_offset:
                return None
            try:
                result = evaluate_fn(server_round + self.round_offset, arrays) if evaluate_fn else None
            except NonFiniteModel as err:
                raise self._broken(server_round + self.round_offset, self.made_by, err) from err
            if server_round and self.on_round_end is not None:
                self.on_round_end(server_round + self.round_offset, arrays)
            return result

        return end

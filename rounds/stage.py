"""The server-stage protocol: what a stage may use, what it contributes and what it hands back.

A stage is a function that the wrapper (`strategies.wrapper.ServerStages`) calls on the global model:
before round 1 (stage 1, pretraining), right after each aggregation (stage 3, alignment), or post hoc,
after the training method's own last step on the round's model (tau-norm, after CCVR's calibration).
It returns an `Outcome`, the weights that become the global model plus what it measured; the run report
writes the measurements, so no stage writes a file of the run itself. A registry entry (`ServerStage`)
pairs the stage factory with its input checks, which the preflight runs before any process starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from flcore.config import Settings


class NonFiniteModel(FloatingPointError):
    """Evaluation met a model with NaN or Inf weights or logits, which must stop the run instead of being
    scored; `arrays` is the model, so the wrapper can name the step that made it."""

    def __init__(self, arrays: ArrayRecord, problem: str) -> None:
        super().__init__(problem)
        self.arrays, self.problem = arrays, problem


@dataclass
class ServerContext:
    """What a stage may use: the config, the server's data and a model factory.

    `data` is `flcore.server_data.ServerData` (test split, D_align, class groups), `new_model()` builds a
    fresh `FLModel` for this run and `evaluate(arrays)` returns the centralized test metrics of any weights
    (`NonFiniteModel` for weights or logits with NaN or Inf).
    """

    cfg: Settings
    data: Any
    new_model: Callable[[], Any]
    evaluate: Callable[[ArrayRecord], dict]


@dataclass
class Outcome:
    """A stage's result: the next global weights, summary sections (each also `<name>.json`) and figures."""

    arrays: ArrayRecord
    sections: dict[str, dict] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib Figure


InitialStage = Callable[[ArrayRecord], Outcome]
RoundStage = Callable[[int, ArrayRecord, MetricRecord], Outcome]


@dataclass
class Stages:
    """The stages one factory contributes, and the sections it measured while building them.

    Each round runs `after_aggregation` on the aggregate, then the training method's own step on their
    result (`rounds.delegate.after_stages`: CCVR's statistics and calibration), then `post_hoc`.
    """

    before_training: list[InitialStage] = field(default_factory=list)
    after_aggregation: list[RoundStage] = field(default_factory=list)
    sections: dict[str, dict] = field(default_factory=dict)
    post_hoc: list[RoundStage] = field(default_factory=list)


def no_check(cfg: Settings, prepared: Any) -> None:
    """For stages whose inputs the config schema already checks."""


@dataclass(frozen=True)
class ServerStage:
    """A registry entry: `check(cfg, prepared)` raises on bad input before any process starts (it may
    not train or load large weights); `build(cfg, ctx)` makes the stages in the ServerApp."""

    build: Callable[[Settings, ServerContext], Stages]
    check: Callable[[Settings, Any], None] = no_check

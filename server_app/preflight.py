"""Every check that can fail before round 1, in one place, run before any Flower process starts.

The launcher calls `preflight` before it starts the SuperLink and Ray; the ServerApp calls it again
first thing (a run started with `flwr run` on a real SuperLink has no launcher). It validates the
config, reads the checkpoint to resume from, loads the dataset and draws the split, and runs the
strategy's and every server stage's own checks (teachers' weights on disk and widths, class names,
logits files, pretraining data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flcore.config import validate
from flcore.experiment import Prepared, prepare
from rounds import checkpoint
from strategies.registry import SERVER_STAGES, STRATEGIES, check_strategy


def validated(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config checked against the schema, with the registry's strategy names."""
    return validate(run_config, choices={"strategy": STRATEGIES})


@dataclass(frozen=True)
class Checked:
    """What the checks read on the way: the data and split, and the checkpoint to resume from (or None)."""

    prepared: Prepared
    resumed: checkpoint.Checkpoint | None


def preflight(cfg: Mapping[str, Any]) -> Checked:
    """Raise `ConfigError` / `DataNotFound` on the first problem, before anything trains."""
    resumed = checkpoint.load(cfg) if cfg["resume"] else None
    prepared = prepare(cfg)
    check_strategy(cfg, prepared)
    for entry in SERVER_STAGES.values():
        entry.check(cfg, prepared)
    return Checked(prepared, resumed)

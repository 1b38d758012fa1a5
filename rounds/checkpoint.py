"""Server checkpoints after every round, and resuming a stopped run from the last one.

A 200-round run must survive a killed server (kill -9 included). After each round's evaluation the
server writes `<run dir>/checkpoint.pt` through a temporary file and `os.replace`, so the file on disk is
always one complete round: the global weights, the round number, the strategy's own state (server
momentum and the like), the RNG states and the metrics rows so far. `resume = "<run dir>"` starts a new
run from it with `strategies.wrapper.ServerStages.round_offset` = the saved round, so clients, seeds, node sampling and
reports see the original round numbers and the run ends with the same weights as an uninterrupted one.

Strategy state: a strategy may define `state_dict() -> dict[str, Tensor-like]` and
`load_state_dict(dict)`. Without them, its attributes are saved and restored generically, recursing
into wrapped strategies: array-valued ones (an `ArrayRecord`, a list or a dict of NumPy arrays or NumPy
scalars, e.g. Flower's FedAvgM `current_arrays`/`momentum_vector`, whose 0-d entries are scalars, or
FedOpt's `m_t`/`v_t`) as arrays, 0-d entries as 0-d arrays, and any other
object with `state_dict()`/`load_state_dict()` (CReFF's server: its federated features) through those.

The file is the server's own and is read with `torch.load(weights_only=True)`: tensors and plain
Python values only, nothing executable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from flcore.arrays import NON_FINITE, non_finite
from flcore.config import ConfigError, Settings
from flcore.files import atomic_write
from flcore.models import PAPER_HEAD, model_head

CHECKPOINT = "checkpoint.pt"
VERSION = 1
PAYLOAD_KEYS = ("version", "round", "arrays", "strategy", "random", "numpy-random", "torch-random", "rows", "config")
# Keys that may change between the stopped run and its continuation without changing the trajectory.
FREE_KEYS = {
    "resume",
    "num-server-rounds",
    "output-dir",
    "round-timeout",
    "eval-every",
    "eval-batch-size",
    "min-replies",
    "max-message-mb",
    "fail-rate",
    "actor-restarts",
    "partition-assignment",  # both rules sample the same partitions in the same order
    "log-to",
    "log-group",
    "log-name",
    "wandb-project",
}


def _tensor(value: np.ndarray | np.number) -> torch.Tensor:
    """A tensor of the same shape; a NumPy scalar (what arithmetic on a 0-d array returns) becomes a 0-d one."""
    return torch.from_numpy(np.array(value, copy=True))


def _numeric(value: Any) -> bool:
    """A NumPy array or NumPy number: Flower's FedAvgM keeps scalars for 0-d arrays (`num_batches_tracked`)."""
    return isinstance(value, np.ndarray | np.number | np.bool_)


def _pack(value: Any) -> tuple[str, Any] | None:
    """A pickle-free form of one array-valued attribute, or None when it is not array state."""
    if isinstance(value, ArrayRecord):
        return "arrays", {k: _tensor(a.numpy()) for k, a in value.items()}
    if isinstance(value, list) and value and all(_numeric(v) for v in value):
        return "list", [_tensor(v) for v in value]
    if isinstance(value, dict) and value and all(_numeric(v) for v in value.values()):
        return "dict", {str(k): _tensor(v) for k, v in value.items()}
    return None


def _unpack(kind: str, value: Any) -> Any:
    if kind == "arrays":
        return ArrayRecord(dict(value))
    if kind == "list":
        return [v.numpy() for v in value]
    return {k: v.numpy() for k, v in value.items()}


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What the strategy carries from round to round (see the module docstring)."""
    if callable(getattr(strategy, "state_dict", None)):
        return {"custom": strategy.state_dict()}
    state: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, Strategy):
            state[name] = ("strategy", strategy_state(value))
        elif _stateful(value):
            state[name] = ("state", value.state_dict())
        elif (packed := _pack(value)) is not None:
            state[name] = packed
    return state


def _stateful(value: Any) -> bool:
    """An object (not a class) that saves and restores its own state, like a torch module."""
    return not isinstance(value, type) and all(
        callable(getattr(value, method, None)) for method in ("state_dict", "load_state_dict")
    )


def load_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    if "custom" in state:
        strategy.load_state_dict(state["custom"])
        return
    for name, (kind, value) in state.items():
        if kind == "strategy":
            load_strategy_state(getattr(strategy, name), value)
        elif kind == "state":
            getattr(strategy, name).load_state_dict(value)
        else:
            setattr(strategy, name, _unpack(kind, value))


def save(
    path: Path, server_round: int, arrays: ArrayRecord, strategy: Strategy, rows: list[dict], cfg: Settings
) -> None:
    """Write one complete checkpoint atomically: a reader (or a resume after kill -9) sees old or new."""
    np_state = np.random.get_state()
    payload = {
        "version": VERSION,
        "round": server_round,
        "arrays": {k: v.clone() for k, v in arrays.to_torch_state_dict().items()},
        "strategy": strategy_state(strategy),
        "random": random.getstate(),
        "numpy-random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch-random": torch.get_rng_state(),
        "rows": json.dumps(rows),
        "config": json.dumps(dict(cfg)),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


@dataclass
class Checkpoint:
    """A loaded checkpoint; `restore` applies the RNG and strategy state right before training goes on."""

    round: int
    arrays: ArrayRecord
    rows: list[dict]
    payload: dict

    def restore(self, strategy: Strategy) -> None:
        load_strategy_state(strategy, self.payload["strategy"])
        random.setstate(_as_tuple(self.payload["random"]))
        name, keys, *rest = self.payload["numpy-random"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(self.payload["torch-random"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def locate(resume: str) -> Path:
    path = Path(resume).expanduser()
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(
            f"run-config key 'resume' = {resume!r} is not allowed: expected a run's output folder holding "
            f"{CHECKPOINT}, or that file (none at {path})."
        )
    return path


def load(cfg: Settings) -> Checkpoint:
    """The checkpoint named by `resume`, checked against this run's config before anything trains."""
    path = locate(cfg.resume)
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, do not guess
        raise ConfigError(f"run-config key 'resume': {path} is not a readable checkpoint ({err}).") from err
    missing = [k for k in PAYLOAD_KEYS if k not in payload] if isinstance(payload, dict) else list(PAYLOAD_KEYS)
    if missing:
        raise ConfigError(
            f"run-config key 'resume': {path} is not a run checkpoint (it lacks {missing[:3]}); expected a run's "
            f"output folder or its {CHECKPOINT}, not a model file."
        )
    try:
        saved = dict(json.loads(payload["config"]))
        rows = json.loads(payload["rows"])
        arrays = ArrayRecord({k: v for k, v in payload["arrays"].items()})
        done = int(payload["round"])
    except Exception as err:
        raise ConfigError(
            f"run-config key 'resume': {path} is a damaged checkpoint ({type(err).__name__}: {err})."
        ) from err
    if bad := non_finite(arrays):
        raise ConfigError(f"run-config key 'resume': {path} holds a model with {NON_FINITE} in {bad[:3]}.")
    differ = sorted(k for k in saved.keys() & cfg.keys() if k not in FREE_KEYS and saved[k] != cfg[k])
    if differ:
        shown = ", ".join(f"{k} = {saved[k]!r} there, {cfg[k]!r} here" for k in differ[:5])
        raise ConfigError(f"run-config key 'resume': the checkpoint's run used different settings: {shown}.")
    if "head" not in saved and model_head(cfg) != PAPER_HEAD:  # written before `head`: every model had the MLP
        raise ConfigError(
            f"run-config key 'head' = {cfg.head!r} is not allowed for resuming {path}: it was written before "
            f"'head' existed, when every run trained the paper's MLP head, and this run's model has {model_head(cfg)}"
            "; set head=mlp."
        )
    if done > cfg.num_server_rounds:
        raise ConfigError(
            f"run-config key 'num-server-rounds' = {cfg.num_server_rounds} is not allowed: the checkpoint "
            f"already finished round {done}."
        )
    if done == cfg.num_server_rounds:
        raise ConfigError(
            f"run-config key 'resume': that run finished all {done} rounds ({path}); nothing is left to train. Set "
            f"num-server-rounds above {done} to train it further."
        )
    return Checkpoint(done, arrays, rows, payload)

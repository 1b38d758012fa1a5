"""TensorBoard and Weights & Biases mirrors of a run's reports (`log-to`).

Researchers follow runs in TensorBoard or W&B, not in metrics.jsonl. `flcore.reports.RunReport` stays the
one writer of the run's files and hands each logger what it writes: every metrics.jsonl row (`scalars`), the
figures, and at the start the run config as hyperparameters. Both loggers write into the run folder:
TensorBoard's event files in `<run>/tensorboard/`, W&B's run files in `<run>/wandb/`. W&B runs offline
(nothing leaves the machine; `wandb sync <run>/wandb/offline-run-*` uploads later) unless WANDB_MODE says
otherwise or the user ran `wandb login`, so a run works on a machine with no network.

`LOGGERS` is the registry: name -> factory taking a `LogTarget`. Each package is imported by its factory
only, so a run that logs nowhere never imports either.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from flcore.config import ConfigError, Settings, log_targets

TENSORBOARD = "tensorboard"  # the event files' folder in the run folder
WANDB_HOST = "api.wandb.ai"  # `wandb login` keeps the key in ~/.netrc under this machine name
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the module it needs


@dataclass(frozen=True)
class LogTarget:
    """Where and under which names one run is logged."""

    run_dir: Path
    name: str
    group: str
    project: str
    config: Mapping[str, Any]


class RunLogger(Protocol):
    def metrics(self, step: int, values: Mapping[str, float]) -> None: ...

    def image(self, name: str, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as scalars. Numbers stay as they are (NaN included: a group without classes);
    a list of numbers becomes one scalar per entry (`per-class-accuracy/3`) and a mapping one per key
    (`node-data/<node>/num-examples`). Lists of lists (the confusion matrix, logged as confusion.png at the
    end) and text are left out; `round` is the step, not a value."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key != "round":
            _flatten(key, value, out)
    return out


def _flatten(key: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool | int | float):
        out[key] = float(value)
    elif isinstance(value, Mapping):
        for name, inner in value.items():
            _flatten(f"{key}/{name}", inner, out)
    elif isinstance(value, list | tuple) and all(isinstance(v, bool | int | float) or v is None for v in value):
        for i, inner in enumerate(value):
            out[f"{key}/{i}"] = math.nan if inner is None else float(inner)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class TensorBoardLogger:
    """Scalars, images and the run config (text, and the HPARAMS tab) in `<run>/tensorboard/`."""

    def __init__(self, target: LogTarget) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(target.run_dir / TENSORBOARD))
        config = {k: v for k, v in target.config.items() if isinstance(v, bool | int | float | str)}
        for summary in hparams(config, {"accuracy": 0.0, "balanced-accuracy": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("run-config", "\n".join(f"    {k} = {json.dumps(v)}" for k, v in config.items()))
        self.writer.flush()

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run followed live: each round visible as it ends

    def image(self, name: str, path: Path, step: int) -> None:
        self.writer.add_image(name, _png(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str | None:
    """None when WANDB_MODE is set (W&B reads it itself); online when the user logged in (WANDB_API_KEY, or the
    key `wandb login` keeps in ~/.netrc); offline otherwise, so a machine without network or account runs."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandbLogger:
    """One W&B run in `<run>/wandb/`: the run config as its config, scalars and images by round."""

    def __init__(self, target: LogTarget) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=target.project,
            group=target.group or None,
            name=target.name,
            dir=str(target.run_dir),
            config=dict(target.config),
            mode=wandb_mode(),
            settings=wandb.Settings(console="off", silent=True),  # Flower keeps the ServerApp's output itself
        )

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


LOGGERS: dict[str, Callable[[LogTarget], RunLogger]] = {
    "tensorboard": TensorBoardLogger,
    "wandb": WandbLogger,
}


def check_loggers(cfg: Settings) -> None:
    """Before anything starts: every logger `log-to` names has its package on this machine."""
    for name in log_targets(cfg.log_to):
        try:
            __import__(PACKAGES[name])
        except ImportError as err:
            raise ConfigError(
                f"run-config key 'log-to' = {cfg.log_to!r} needs the '{PACKAGES[name]}' package, which is not "
                f"installed ({err}); pip install '.[logging]' (or {PACKAGES[name]}), or set log-to = none."
            ) from err


def open_loggers(cfg: Settings, run_dir: Path, run_id: int | str) -> list[RunLogger]:
    """The loggers `log-to` names, each started for this run (the run config already logged)."""
    target = LogTarget(run_dir, cfg.log_name or str(run_id), cfg.log_group, cfg.wandb_project, cfg)
    return [LOGGERS[name](target) for name in log_targets(cfg.log_to)]

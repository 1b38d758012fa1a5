"""A run's output folder: config, per-round metrics, summary, plots and final weights.

`RunReport` is the one writer of a run's artifacts. Layout of `<output-dir>/<run-id>/`: config.json,
partition.json + partition.png, metrics.jsonl (one line per evaluated round, appended and flushed as the
run goes, so a crash keeps what was done, and cut back to whole lines if an append fails), summary.json,
curves.png, confusion.png, model.pt, and what the server stages measured (`take`): a `<name>.json` per
summary section (pretrain.json, alignment.json) and their figures (alignment-step.png). Every file but the
metrics log is written atomically (`flcore.files`); the checkpoint for resume is written beside them by
`rounds.checkpoint`.

Every metrics row and figure also goes to the loggers `log-to` names (`flcore.loggers`), given with
`log_to`; `finish` ends them (a run that fails leaves them to end at exit: TensorBoard's files are flushed
after every write, W&B ends its run itself).

When the nodes hold their own data (client-data=local) the server knows no split: partition.json/.png
then show what each node reported (its image count and images per class; each node's latest report),
kept per round in metrics.jsonl (`node-data`) and in the summary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from flcore.config import Settings
from flcore.files import append_text, atomic_write, json_safe, write_json
from flcore.loggers import scalars
from flcore.metrics import row_normalised
from flcore.progress import pace

matplotlib.use("Agg")  # files only, never a window; pyplot takes its backend at the first figure, not at import

METRICS = "metrics.jsonl"  # one JSON object per evaluated round
SUMMARY = "summary.json"  # written once, when the run completed
MAX_FIGURE_INCHES = 14  # a figure's side: one row per client would otherwise grow without bound
SCALAR_KEYS = ("accuracy", "balanced-accuracy", "many-accuracy", "medium-accuracy", "few-accuracy")
NODE_DATA = "node-data"  # metrics row / summary key: node label -> {num-examples, class-counts} as reported


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows in round order (round 0 first when the initial model was evaluated); the
    one reader of what `RunReport.record_eval` writes, for benchmarks and tests alike. A run still going has
    the rows so far; blank lines are skipped."""
    text = (Path(run_dir) / METRICS).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A completed run's summary.json (what `RunReport.finish` returned)."""
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def save_figure(fig: Figure, path: Path) -> None:
    """Save a figure atomically as PNG and free it, also when the write fails."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class RunReport:
    """Writes one run's reports and prints a one-line progress report per round."""

    def __init__(self, out_dir: Path, num_rounds: int, classes: Sequence[str]) -> None:
        self.dir = out_dir
        self.num_rounds = num_rounds
        self.classes = list(classes)
        self.rows: list[dict] = []
        self.sections: dict[str, dict] = {}
        self._pending: dict[int, dict] = {}
        self._drawn: dict[str, dict] = {}
        self._t0 = self._last = time.perf_counter()
        self._clock: tuple[int, float] | None = None  # the first round timed in this process, and when it ended
        self.loggers: list[Any] = []  # flcore.loggers.RunLogger

    @classmethod
    def create(cls, cfg: Settings, run_id: int | str, classes: Sequence[str]) -> RunReport:
        out = Path(cfg.output_dir).expanduser() / str(run_id)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dict(cfg))
        return cls(out, cfg.num_server_rounds, classes)

    def log_to(self, loggers: Sequence[Any]) -> None:
        """Mirror every row and figure from now on to `loggers` (TensorBoard, W&B)."""
        self.loggers = list(loggers)

    def close_loggers(self) -> None:
        """End the loggers (once; a later call does nothing)."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()

    def _figure(self, fig: Figure, name: str) -> None:
        """Save a figure of the run folder and hand it to the loggers at the latest round."""
        save_figure(fig, self.dir / name)
        step = self.rows[-1]["round"] if self.rows else 0
        for logger in self.loggers:
            logger.image(Path(name).stem, self.dir / name, step)

    def write_partition(
        self,
        histogram: np.ndarray,
        pool_counts: np.ndarray,
        groups: Mapping[str, list[int]],
        nodes: Sequence[str] | None = None,
        reserve: Mapping[str, list[int]] | None = None,
    ) -> None:
        """Per-client class histogram as JSON and heatmap, with the long-tail counts and class groups; `nodes`
        names the rows when they are what nodes holding their own data reported; `reserve` is the holdout
        teacher's (its training images per class, and what the pool gave up for it), kept as `holdout-reserve`."""
        content = {
            "classes": self.classes,
            "pool-counts": pool_counts.tolist(),
            "groups": dict(groups),
            "clients": histogram.tolist(),
        }
        if nodes is not None:
            content.update({"nodes": list(nodes), "source": "reported by the nodes (counts only)"})
        if reserve:
            content["holdout-reserve"] = dict(reserve)
        write_json(self.dir / "partition.json", content)
        height = min(MAX_FIGURE_INCHES, max(4, 0.3 * len(histogram) + 1.5))  # 1,000 clients: not 300 inches
        fig, ax = plt.subplots(figsize=(min(MAX_FIGURE_INCHES, max(6, 0.35 * len(self.classes) + 2)), height))
        im = ax.imshow(histogram, aspect="auto", cmap="viridis")
        what = "reported by the nodes, " if nodes is not None else ""
        title = f"Images per client and class ({what}pool {int(pool_counts.sum())})"
        if reserve and "pool-cut" in reserve:
            title += f"\nthe pool gave up {sum(reserve['pool-cut'])} images to the holdout teacher's reserve"
        ax.set(xlabel="class", ylabel="node" if nodes is not None else "client", title=title)
        if len(self.classes) <= 20:
            ax.set_xticks(range(len(self.classes)), self.classes, rotation=45, ha="right")
        if len(histogram) <= 40:
            ax.set_yticks(range(len(histogram)), nodes)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        self._figure(fig, "partition.png")

    def take(self, outcome: Any) -> None:
        """What a server stage measured (`rounds.stage.Outcome`): summary sections, each also written as
        `<name>.json`, and figures, each written under its file name."""
        for name, section in outcome.sections.items():
            self.sections[name] = dict(section)
            write_json(self.dir / f"{name}.json", section)
        for name, fig in outcome.figures.items():
            self._figure(fig, name)

    def restore(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Take over the rows of a resumed run, so metrics.jsonl and the summary cover the whole run."""
        self.rows = [dict(r) for r in rows]
        text = "".join(json.dumps(json_safe(r)) + "\n" for r in self.rows)
        atomic_write(self.dir / METRICS, lambda tmp: tmp.write_text(text))

    def record_train(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Keep the round's aggregated client metrics until its evaluation arrives."""
        self._pending[server_round] = {**self._pending.get(server_round, {}), **metrics}

    def record_nodes(self, server_round: int, nodes: Mapping[str, Mapping[str, Any]]) -> None:
        """What nodes holding their own data reported this round (image count and images per class, nothing
        else); kept with the round's row, and the partition files redrawn from every node's latest report."""
        pending = self._pending.setdefault(server_round, {})
        pending[NODE_DATA] = {**pending.get(NODE_DATA, {}), **{k: dict(v) for k, v in nodes.items()}}
        latest = {**self.node_data(), **pending[NODE_DATA]}
        if latest != self._drawn:  # a node joined or its folder changed
            self.write_node_partition(latest)
            self._drawn = latest

    def node_data(self) -> dict[str, dict]:
        """Each reporting node's latest report, over the rows so far (a resumed run's included)."""
        latest: dict[str, dict] = {}
        for row in self.rows:
            latest.update(row.get(NODE_DATA, {}))
        return latest

    def write_node_partition(self, nodes: Mapping[str, Mapping[str, Any]]) -> None:
        """partition.json/.png from the nodes' reports, in node-label order; no long tail is known, so no groups."""
        names, width = sorted(nodes), len(self.classes)
        rows = [(list(nodes[n]["class-counts"]) + [0] * width)[:width] for n in names]  # as long as the class list
        histogram = np.asarray(rows, dtype=np.int64).reshape(len(names), width)
        self.write_partition(histogram, histogram.sum(axis=0), {}, names)

    def record_eval(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Append one metrics.jsonl line and print the round's progress line."""
        now = time.perf_counter()
        row = {
            "round": server_round,
            "seconds": round(now - self._last, 3),
            "elapsed": round(now - self._t0, 3),
            **self._pending.pop(server_round, {}),
            **metrics,
        }
        self._last = now
        self.rows.append(row)
        append_text(self.dir / METRICS, json.dumps(json_safe(row)) + "\n")
        if self.loggers:
            values = scalars(row)
            for logger in self.loggers:
                logger.metrics(server_round, values)
        left = self.time_left(server_round, now)
        print(self.progress_line(row) + (f" | {left}" if left else ""), flush=True)

    def round_ended(self, server_round: int) -> None:
        """A round without an evaluation (eval-every > 1) still prints how far the run is and the time left."""
        if not self.rows or self.rows[-1]["round"] != server_round:
            print(f"[round {server_round:>3}/{self.num_rounds}] {self.time_left(server_round) or 'done'}", flush=True)

    def time_left(self, server_round: int, now: float | None = None) -> str:
        """`s/round, ~time left`, timed from the first round this process saw end (the set-up before it, and a
        resumed run's earlier rounds, are not rounds' time); empty for that first round."""
        now = time.perf_counter() if now is None else now
        if self._clock is None:
            self._clock = (server_round, now)
        first, since = self._clock
        return pace(server_round, self.num_rounds, now - since, "round", initial=first)

    def progress_line(self, row: Mapping[str, Any]) -> str:
        loss = row.get("train-loss")
        return (
            f"[round {row['round']:>3}/{self.num_rounds}] "
            f"loss {_fmt(loss)} | acc {_fmt(row['accuracy'])} bal {_fmt(row['balanced-accuracy'])} | "
            f"many {_fmt(row.get('many-accuracy'))} med {_fmt(row.get('medium-accuracy'))} "
            f"few {_fmt(row.get('few-accuracy'))} | {row['seconds']:.1f}s"
        )

    def finish(self, state_dict: Mapping[str, torch.Tensor], extra: Mapping[str, Any] | None = None) -> dict:
        """Write summary.json, the plots and the final weights (on the CPU, loadable anywhere); return the summary."""
        weights = {k: v.detach().cpu() for k, v in state_dict.items()}
        atomic_write(self.dir / "model.pt", lambda tmp: torch.save(weights, tmp))
        last = self.rows[-1]
        summary = {
            "rounds": self.num_rounds,
            "wall-seconds": round(time.perf_counter() - self._t0, 2),
            "final": {k: last.get(k) for k in SCALAR_KEYS},
            "best-accuracy": max(r["accuracy"] for r in self.rows),
            "per-class-accuracy": last["per-class-accuracy"],
            **({NODE_DATA: self.node_data()} if self.node_data() else {}),
            **self.sections,
            **(extra or {}),
        }
        write_json(self.dir / SUMMARY, summary)
        self._plot_curves()
        plot_confusion(
            np.asarray(last["confusion-matrix"]),
            self.classes,
            self.dir / "confusion.png",
            f"Round {last['round']}: accuracy {last['accuracy']:.3f}",
        )
        for logger in self.loggers:
            logger.image("confusion", self.dir / "confusion.png", last["round"])
        self.close_loggers()
        return summary

    def _plot_curves(self) -> None:
        rounds = [r["round"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in SCALAR_KEYS:
            vals = [np.nan if r.get(key) is None else r[key] for r in self.rows]
            ax.plot(rounds, vals, marker="o", ms=3, label=key.replace("-accuracy", "") if key != "accuracy" else key)
        ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Centralized evaluation per round")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        self._figure(fig, "curves.png")


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (each true class sums to 1)."""
    norm = row_normalised(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(12, 0.45 * n + 3), min(11, 0.45 * n + 2.5)))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.01:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)

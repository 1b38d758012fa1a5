"""Compare methods on one dataset and config: a grid of methods x imbalance factors x seeds.

Every cell is one real run, `python -m server_app.launch` with its own `output-dir`
(<out>/cells/<method>/if<IF>/seed<seed>/), run one after another, or `--jobs N` at once, each on its own
share of the cores (and its own GPU, or a share of them, on a GPU machine). A cell whose run already wrote a
summary.json is not rerun, so an interrupted grid resumes where it stopped. From the finished cells it
writes, into <out>/:

- `table.md`: the paper's Table 2 shape (rows methods, columns IFs, final test accuracy in % as
  mean +- std over seeds, best per column in bold) with cost columns: mean round wall time, bytes one
  client uploads per round (reported by the clients, `upload-bytes`) and client peak memory
  (`peak-rss-mb`, the worker process's ru_maxrss);
- `results.csv`: one line per cell;
- `curves_if<IF>.png`: test accuracy per round, mean over seeds, one line per method;
- `figure4_if<IF>_seed<seed>.png` and `.json`: the paper's Figure 4 for every IF and seed whose `ours` and
  `ours-no-align` cells finished here: the final confusion matrices of the run trained without alignment
  and of the run trained with it, side by side, with overall and many/medium/few accuracy.

With `--run-config "log-to=tensorboard,wandb"` every cell also logs to TensorBoard and W&B, named so the
grid's rows sit side by side in their UIs: each cell's run is named `<method>-if<IF>-seed<seed>` and the
grid's are one W&B group, the grid folder's name (`log-name`, `log-group`; a --run-config value wins), and
their event files are all under one folder, `tensorboard --logdir <out>/cells`.

`--include results.csv` fills cells of this grid that have no finished run here with the rows of an
earlier grid's CSV (another session or machine), so a grid can be finished where its cell folders are
gone; the CSV keeps each cell's per-round curve, so included rows are plotted too (rows from CSVs
written before the curve column are not).

Usage:
    python -m bench.compare --quick
    python -m bench.compare --ifs 100,50,10 --seeds 7,8,9 --run-config "num-server-rounds=20" --jobs 2
    python -m bench.compare --ifs 10 --include bench/results/compare-full/results.csv --report-only
    python -m bench.compare --methods fedavg,ours --method "ours=pretrain=true align=true align-steps=4"
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import queue
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from alignment.figure import plot_pair
from bench.runs import LOG, ROOT, Slot, launch_run, run_dirs, slots
from flcore.arrays import NON_FINITE
from flcore.device import visible_gpus
from flcore.reports import read_metrics, read_summary
from flcore.run_config import parse_overrides

matplotlib.use("Agg")  # files only, never a window; pyplot takes its backend at the first figure, not at import

# Method name -> run-config overrides that select it. `--method name=k=v ...` adds or replaces entries.
# The first twelve are the paper's Table 2 baselines; FedLC and FedRS are long-tail methods beyond it.
METHODS: dict[str, str] = {
    "fedavg": "strategy=fedavg",
    "fedprox": "strategy=fedprox",
    "fedavgm": "strategy=fedavgm",
    "fednova": "strategy=fednova",
    "focal": "loss=focal",
    "ratioloss": "strategy=ratioloss lr=0.001 momentum=0.9 weight-decay=0.0005",  # see OWN_TRAINING
    "feddf": "strategy=feddf",
    "fedbe": "strategy=fedbe",
    "tau-norm": "tau-norm=1.0",
    "ccvr": "strategy=ccvr",
    "creff": "strategy=creff",
    "clip2fl": "strategy=clip2fl",
    "fedlc": "loss=fedlc",
    "fedrs": "loss=fedrs",
    "fedetf": "strategy=fedetf",  # FedETF (ICCV 2023): fixed simplex-ETF classifier, balanced softmax
    "fedloge": "strategy=fedloge",  # FedLoGe (ICLR 2024): sparse ETF backbone, realigned global head (its column)
    "fedyoyo": "strategy=fedyoyo",  # FedYoYo (2025): two views, drifting logit adjustment, self-distillation
    "ours": "pretrain=true align=true",  # MLLM-LLaVA-FL: stage 1 + FedAvg + stage 3
    "ours-no-align": "pretrain=true",
    # Offline, with the stand-in teacher (align-teacher=holdout) that knows the classes, so the KL term of
    # stage 3 and CLIP2FL's client distillation carry a signal: teachers of equal knowledge for both.
    "align-beta0": "align=true align-teacher=holdout align-beta=0.0",
    "align-holdout": "align=true align-teacher=holdout",
    "ours-holdout": "pretrain=true align=true align-teacher=holdout",
    "clip2fl-holdout": "strategy=clip2fl align-teacher=holdout",
}
# The clients' training: every row uses the grid's unless its method sets its own, which the table marks.
TRAINING_KEYS = ("local-epochs", "batch-size", "lr", "momentum", "weight-decay", "augment")
OWN_TRAINING = {  # why a built-in method trains its clients its own way, for the table's footnote
    "ratioloss": "its authors' optimiser (utils/options.py, models/Update.py); at the protocol's lr 0.1 the Ratio "
    "Loss's clients diverge",
}
CURVE = "curve"  # a cell's per-round [round, accuracy] pairs, a JSON list in the CSV
FIGURE4 = ("ours-no-align", "ours")  # the paper's Figure 4: the run trained without alignment, then with it
GROUP_KEYS = ("accuracy", "balanced-accuracy", "many-accuracy", "medium-accuracy", "few-accuracy")
# The paper's twelve Table 2 baselines, FedLC, FedRS, the methods since the paper (FedETF, FedYoYo), ours and
# ours-no-align: the rows of the README's table.
TABLE_METHODS = tuple(list(METHODS)[: list(METHODS).index("ours-no-align") + 1])
QUICK_CONFIG = (
    "num-clients=4 fraction-train=0.5 num-server-rounds=3 local-epochs=5 batch-size=16 image-size=8 projection-dim=64"
)


@dataclass
class Cell:
    method: str
    imbalance: float
    seed: int
    dir: Path

    @property
    def key(self) -> tuple[str, float, int]:
        return self.method, self.imbalance, self.seed

    @property
    def name(self) -> str:
        """The cell's run name in TensorBoard and W&B."""
        return f"{self.method}-if{self.imbalance:g}-seed{self.seed}"

    def finished_run(self) -> Path | None:
        """The cell's latest run that completed, if any."""
        found = run_dirs(self.dir, finished=True)
        return found[-1] if found else None


def run_cell(cell: Cell, overrides: Mapping[str, object], slot: Slot | None = None) -> bool:
    """One launch of the real app into the cell's folder; its output goes to the cell's launch.log."""
    return launch_run(cell.dir, {**overrides, "imbalance-factor": cell.imbalance, "seed": cell.seed}, slot=slot)


def run_cells(todo: Sequence[tuple[str, Cell, Mapping[str, object]]], places: Sequence[Slot | None]) -> None:
    """Launch the cells, as many at once as there are `places` (each run in its own slot), in grid order; a line
    per cell as it ends. Each cell is a separate run, so the grid's numbers do not depend on how many run at once."""
    free: queue.SimpleQueue[Slot | None] = queue.SimpleQueue()
    for place in places:
        free.put(place)

    def one(label: str, cell: Cell, overrides: Mapping[str, object]) -> None:
        place, start = free.get(), time.perf_counter()
        try:
            ok = run_cell(cell, overrides, slot=place)
        finally:
            free.put(place)
        status = "ok" if ok else f"FAILED (see {cell.dir / LOG})"
        print(f"{label}: {status} in {time.perf_counter() - start:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=len(places)) as pool:
        for done in [pool.submit(one, *job) for job in todo]:
            done.result()


def cell_failure(cell: Cell) -> str | None:
    """Why a cell that was launched has no summary: `diverged` when its clients' updates went NaN or Inf
    (every reply refused), else `failed`; None for a finished cell or one never launched."""
    log = cell.dir / LOG
    if cell.finished_run() is not None or not log.is_file():
        return None
    return "diverged" if NON_FINITE in log.read_text(errors="replace") else "failed"


def cell_result(cell: Cell) -> dict | None:
    """Accuracy and cost figures of a finished cell, read from its summary.json and metrics.jsonl."""
    run = cell.finished_run()
    if run is None:
        return None
    summary, rows = read_summary(run), read_metrics(run)
    trained = [r for r in rows if r["round"] > 0]
    rounds_between = [b["round"] - a["round"] for a, b in zip(rows, rows[1:], strict=False)]
    seconds = [r["seconds"] / max(n, 1) for r, n in zip(rows[1:], rounds_between, strict=True)]
    final = summary["final"]
    return {
        "method": cell.method,
        "imbalance-factor": cell.imbalance,
        "seed": cell.seed,
        "accuracy": final["accuracy"],
        "balanced-accuracy": final["balanced-accuracy"],
        "many-accuracy": final["many-accuracy"],
        "medium-accuracy": final["medium-accuracy"],
        "few-accuracy": final["few-accuracy"],
        "round-seconds": statistics.fmean(seconds) if seconds else float("nan"),
        "upload-bytes": statistics.fmean(r.get("upload-bytes", float("nan")) for r in trained),
        "peak-rss-mb": max(r.get("peak-rss-mb", float("nan")) for r in trained),
        "wall-seconds": summary["wall-seconds"],
        "client-uploads": summary.get("client-uploads", ""),
        "client-runs": summary.get("client-runs", ""),
        CURVE: [(r["round"], r["accuracy"]) for r in rows],
    }


CSV_TEXT = ("method", "client-uploads", "client-runs")


def _typed(key: str, value: str) -> object:
    if key in CSV_TEXT:
        return value
    if key == CURVE:
        return [tuple(pair) for pair in json.loads(value)]
    return int(value) if key == "seed" else float(value)


def read_csv(path: Path) -> list[dict]:
    """Rows of an earlier grid's results.csv, typed like `cell_result` (CSVs older than the curve column,
    or rows written from such CSVs, have no curve)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: _typed(k, v) for k, v in row.items() if k != CURVE or v} for row in rows]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _finite_mean(values: Iterable[float]) -> float:
    """The mean of the finite values: a run whose last rounds had no valid reply has NaN figures for them."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def training_notes(methods_cfg: Mapping[str, str], methods: Sequence[str]) -> dict[str, str]:
    """Method -> a footnote for each row whose clients train with settings of their own (`TRAINING_KEYS`), and for
    each built-in row that `--method` redefined, so that a row run at other settings than the rest of the table,
    or than its built-in definition, says so."""
    notes = {}
    for m in methods:
        overrides = parse_overrides([methods_cfg[m]])
        own = {k: v for k, v in overrides.items() if k in TRAINING_KEYS}
        parts = []
        if own:
            why = f": {OWN_TRAINING[m]}" if m in OWN_TRAINING else ""
            parts.append(f"{m} trains its clients with {pairs_text(own)}, not the grid's settings{why}.")
        builtin = parse_overrides([METHODS[m]]) if m in METHODS else overrides
        if overrides != builtin:
            changed = {k: v for k, v in overrides.items() if builtin.get(k) != v}
            parts.append(f"{m} runs here with {pairs_text(changed)} (redefined by --method; built in: {METHODS[m]}).")
        if parts:
            notes[m] = " ".join(parts)
    return notes


def pairs_text(pairs: Mapping[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def table(
    results: list[dict],
    methods: Sequence[str],
    ifs: Sequence[float],
    failures: Mapping[tuple[str, float], Sequence[str]] | None = None,
    notes: Mapping[str, str] | None = None,
    seeds: int = 0,
) -> str:
    """Markdown in the shape of the paper's Table 2, with cost columns; best mean per IF in bold; a cell with fewer
    finished seeds than the grid's `seeds` says how many (`n=1`: its ± 0.00 is no spread over seeds).

    `failures` lists, per (method, IF), why launched seeds did not finish; such a cell says how many
    (`diverged` alone when no seed finished), so a method that blew up is not mistaken for one not run.
    `notes` (from `training_notes`) mark their rows with a number and follow the table as footnotes."""
    failures, notes = failures or {}, notes or {}
    rows = [m for m in methods if any(r["method"] == m for r in results) or any(failures.get((m, i)) for i in ifs)]
    noted_rows = [m for m in rows if m in notes]
    means = {
        (m, i): _mean_std([100 * r["accuracy"] for r in results if r["method"] == m and r["imbalance-factor"] == i])
        for m in methods
        for i in ifs
        if any(r["method"] == m and r["imbalance-factor"] == i for r in results)
    }
    best = {i: max((means[m, i][0] for m in methods if (m, i) in means), default=None) for i in ifs}
    head = ["method", *[f"IF {i:g}" for i in ifs], "round s", "upload / client / round", "client peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        mine = [r for r in results if r["method"] == m]
        cells = []
        for i in ifs:
            why = failures.get((m, i), [])
            noted = ", ".join(f"{why.count(w)} {w}" for w in sorted(set(why)))
            if (m, i) not in means:
                cells.append(noted.split(" ", 1)[1] if len(why) == 1 else noted or "–")
                continue
            mean, std = means[m, i]
            text = f"{mean:.2f} ± {std:.2f}"
            text = f"**{text}**" if mean == best[i] else text
            done = sum(r["imbalance-factor"] == i for r in mine)
            said = ", ".join([*([f"n={done}"] if done < seeds else []), *([noted] if why else [])])
            cells.append(f"{text} ({said})" if said else text)
        label = f"{m} [{noted_rows.index(m) + 1}]" if m in notes else m
        if not mine:
            lines.append("| " + " | ".join([label, *cells, "–", "–", "–"]) + " |")
            continue
        cost = [
            f"{_finite_mean(r['round-seconds'] for r in mine):.2f}",
            f"{_finite_mean(r['upload-bytes'] for r in mine) / 2**20:.2f} MiB",
            f"{max(r['peak-rss-mb'] for r in mine):.0f}",
        ]
        lines.append("| " + " | ".join([label, *cells, *cost]) + " |")
    footnotes = [f"[{n}] {notes[m]}" for n, m in enumerate(noted_rows, 1)]
    return "\n".join(lines + ([""] + footnotes if footnotes else [])) + "\n"


def write_csv(results: list[dict], path: Path) -> None:
    """One line per cell; the curve as JSON so that `--include` can plot it again."""
    keys = [k for k in results[0] if k != CURVE] + [CURVE]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows({**r, CURVE: json.dumps(r[CURVE]) if CURVE in r else ""} for r in results)


def plot_curves(results: list[dict], methods: Sequence[str], ifs: Sequence[float], out: Path) -> None:
    """One plot per IF, mean over seeds per method; rows without a curve (from old CSVs) are left out,
    and an IF without any curve gets no plot."""
    for i in ifs:
        series = {}
        for m in methods:
            curves = [dict(r[CURVE]) for r in results if (r["method"], r["imbalance-factor"]) == (m, i) and CURVE in r]
            if curves:
                rounds = sorted(set.intersection(*(set(c) for c in curves)))
                series[m] = (rounds, [statistics.fmean(c[x] for c in curves) for x in rounds])
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, (rounds, mean) in series.items():
            # tab20: the default cycle has 10 colours and the grid has up to 20 methods
            ax.plot(rounds, mean, marker="o", ms=3, color=plt.cm.tab20(methods.index(m) % 20), label=m)
        ax.set(xlabel="round", ylabel="test accuracy (mean over seeds)", ylim=(0, 1), title=f"IF {i:g}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"curves_if{i:g}.png", dpi=110)
        plt.close(fig)


def final_model(run: Path) -> tuple[np.ndarray, dict, list[str]]:
    """A finished run's final confusion matrix (last metrics.jsonl row), its accuracies (summary.json) and
    its class names (partition.json)."""
    final = read_summary(run)["final"]
    cm = np.asarray(read_metrics(run)[-1]["confusion-matrix"])
    partition = run / "partition.json"
    classes = json.loads(partition.read_text())["classes"] if partition.is_file() else [str(c) for c in range(len(cm))]
    return cm, {k: final[k] for k in GROUP_KEYS}, classes


def figure4(without_run: Path, with_run: Path, label: str) -> tuple[Figure, dict]:
    """The paper's Figure 4 from two runs of the same setting: trained without alignment, and with it."""
    cm_without, without, classes = final_model(without_run)
    cm_with, with_, _ = final_model(with_run)
    fig = plot_pair(
        cm_without,
        cm_with,
        without,
        with_,
        classes,
        (f"without alignment ({FIGURE4[0]})", f"with alignment ({FIGURE4[1]})"),
        f"Figure 4: final global models of two runs, {label}",
    )
    numbers = {
        "setting": label,
        "without-alignment": {"method": FIGURE4[0], "run": str(without_run), **without},
        "with-alignment": {"method": FIGURE4[1], "run": str(with_run), **with_},
    }
    return fig, numbers


def write_figure4(cells: Sequence[Cell], out: Path) -> list[Path]:
    """`figure4_if<IF>_seed<seed>.png/.json` for every IF and seed whose two Figure 4 cells finished here."""
    finished = {c.key: run for c in cells if (run := c.finished_run()) is not None}
    written = []
    for imbalance, seed in sorted({(c.imbalance, c.seed) for c in cells}):
        runs = [finished.get((method, imbalance, seed)) for method in FIGURE4]
        if None in runs:
            continue
        fig, numbers = figure4(runs[0], runs[1], f"IF {imbalance:g}, seed {seed}")
        stem = out / f"figure4_if{imbalance:g}_seed{seed}"
        fig.savefig(stem.with_suffix(".png"), dpi=110)
        plt.close(fig)
        stem.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n")
        written.append(stem.with_suffix(".png"))
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--method", action="append", default=[], help="define a method: 'name=k=v k2=v2'")
    parser.add_argument("--ifs", default="100,50,10", help="comma-separated imbalance factors")
    parser.add_argument("--seeds", default="7,8,9", help="comma-separated seeds")
    parser.add_argument("--run-config", default="", help="overrides shared by every cell: 'k=v k2=v2'")
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells run at once, each on its own share of the cores and GPUs (default 1)"
    )
    parser.add_argument("--out", default=str(ROOT / "outputs" / "compare"), help="output folder")
    parser.add_argument(
        "--include", action="append", default=[], type=Path, help="earlier results.csv filling cells not run here"
    )
    parser.add_argument("--quick", action="store_true", help="CI grid: tiny digits runs, 1 seed, IF 10/50")
    parser.add_argument(
        "--report-only", action="store_true", help="write the table from the finished cells; run nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.ifs, args.seeds = args.methods or ",".join(TABLE_METHODS), "10,50", "7"
        args.run_config = f"{QUICK_CONFIG} {args.run_config}".strip()
        if args.out == parser.get_default("out"):
            args.out = str(ROOT / "outputs" / "compare-quick")
    return args


def included(paths: Sequence[Path], cells: Sequence[Cell]) -> dict[tuple, dict]:
    """Rows of earlier CSVs for the grid's cells, by (method, IF, seed); the first CSV wins a tie."""
    wanted = {c.key for c in cells}
    rows: dict[tuple, dict] = {}
    for path in paths:
        for row in read_csv(path):
            key = (row["method"], row["imbalance-factor"], row["seed"])
            if key in wanted:
                rows.setdefault(key, row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    methods_cfg = dict(METHODS)
    for spec in args.method:
        name, _, pairs = spec.partition("=")
        methods_cfg[name] = pairs
    methods = [m for m in (args.methods or ",".join(methods_cfg)).split(",") if m]
    unknown = [m for m in methods if m not in methods_cfg]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {', '.join(methods_cfg)}", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.include if not p.is_file()]
    if missing:
        print(f"error: --include: no such file(s) {missing}", file=sys.stderr)
        return 2
    try:
        places = slots(args.jobs, gpus=visible_gpus()) if args.jobs != 1 else [None]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ifs = [float(x) for x in args.ifs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    base = parse_overrides([args.run_config]) if args.run_config else {}
    out = Path(args.out).resolve()
    # Seed-major order: a grid stopped early still has every method and IF for its first seeds.
    cells = [Cell(m, i, s, out / "cells" / m / f"if{i:g}" / f"seed{s}") for s in seeds for i in ifs for m in methods]
    borrowed = included(args.include, cells)  # a cell finished here still wins over its borrowed row
    t0 = time.perf_counter()
    todo = []
    for n, cell in enumerate(cells, 1):
        label = f"[{n}/{len(cells)}] {cell.method} IF {cell.imbalance:g} seed {cell.seed}"
        done = cell.finished_run() is not None
        if done or args.report_only or cell.key in borrowed:
            how = "done before" if done else "from --include" if cell.key in borrowed else "not run"
            print(f"{label}: {how}, skipped", flush=True)
        else:
            names = {"log-group": out.name, "log-name": cell.name}  # the grid's group, the cell's row
            todo.append((label, cell, {**names, **base, **parse_overrides([methods_cfg[cell.method]])}))
    run_cells(todo, places)
    results = [cell_result(c) or borrowed.get(c.key) for c in cells]
    results = [r for r in results if r is not None]
    if not results:
        print("error: no cell finished", file=sys.stderr)
        return 1
    failures: dict[tuple[str, float], list[str]] = {}
    for cell in cells:
        if cell.key not in borrowed and (why := cell_failure(cell)):
            failures.setdefault((cell.method, cell.imbalance), []).append(why)
    text = table(results, methods, ifs, failures, training_notes(methods_cfg, methods), seeds=len(seeds))
    out.mkdir(parents=True, exist_ok=True)  # a report of borrowed rows alone has no cell folder here
    (out / "table.md").write_text(text)
    write_csv(results, out / "results.csv")
    plot_curves(results, methods, ifs, out)
    figures = write_figure4(cells, out)
    print(text)
    if figures:
        print(f"Figure 4 (with vs without alignment): {', '.join(p.name for p in figures)}")
    print(f"{len(results)}/{len(cells)} cells finished; grid wall time {time.perf_counter() - t0:.0f} s; see {out}")
    if "tensorboard" in str(base.get("log-to", "")):
        print(f"TensorBoard, every cell of the grid: tensorboard --logdir {out / 'cells'}")
    return 0 if len(results) == len(cells) or args.report_only else 1


if __name__ == "__main__":
    sys.exit(main())

"""Many virtual clients: start-up, seconds per round and peak memory at 100 and at 1,000 clients, 10 sampled.

Both runs go through the real launcher (`python -m server_app.launch`) on one `folder` dataset of
CIFAR-shaped (32x32 RGB) random images, written once to a temporary folder and read by both: large
enough that each of 1,000 clients holds 5 images. Every client holds 5 images in both runs, so a sampled
client's work (one local epoch of one batch) is the same and what differs is the number of clients that
exist: the smaller run puts the images the larger run's extra clients hold into the server's D_align
(`align-per-class`; stage 3 is off, so the server keeps only their file names).

What is measured:

- start-up seconds: from the launch to the moment round 1's row appears in metrics.jsonl, less one
  ordinary round (the mean below). That is everything a run does once: checks, SuperLink, Ray, the
  ServerApp's data and initial evaluation, node discovery, the actors' first data load.
- seconds per round: the mean of metrics.jsonl's `seconds` over rounds 2..R (round 1 carries the
  one-off costs above).
- peak memory: resident memory (VmRSS from /proc, sampled every 0.2 s) of the simulation process
  (`flwr-simulation`: the ServerApp, Flower's simulation engine and the Ray driver), of all Ray
  ClientApp actors together (`ray::ClientAppActor`), and of the launcher's whole process tree. Sums
  of RSS count pages shared between processes (torch's libraries) once per process; a child forked but
  not yet exec'd (same command line as its parent, for a moment while a process starts another) is not
  counted, its pages being its parent's.

With `--repeats N` each size runs N times, the sizes taking turns, and the table shows each size's
shortest times and highest memory peaks: on a machine shared with other jobs the shortest time is the
least disturbed one.

Usage: python -m bench.scale [--clients 100 1000] [--rounds 4] [--sampled 10] [--repeats 2] [--run-config "k=v"]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.runs import failure, launch_run, run_dirs
from flcore.reports import read_metrics
from server_app.watchdog import process_tree

CLASSES = 10
SIDE = 32  # CIFAR's image size
IMAGES_PER_CLIENT = 5
ALIGN_PER_CLASS = 2
TEST_PER_CLASS = 20
SETTINGS = (
    "dataset=folder image-size=8 imbalance-factor=1.0 dirichlet-alpha=1.0 min-partition-size=2 "
    "local-epochs=1 batch-size=8 projection-dim=16 augment=false"
)


def write_dataset(root: Path, max_clients: int, seed: int = 0) -> int:
    """root/train/<class>/*.png and root/test/<class>/*.png of random RGB noise; returns the train image count."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    per_class = -(-(max_clients * IMAGES_PER_CLIENT) // CLASSES) + ALIGN_PER_CLASS
    for split, count in (("train", per_class), ("test", TEST_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(rng.integers(0, 256, (count, SIDE, SIDE, 3), dtype=np.uint8)):
                Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return per_class * CLASSES


def rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Watch:
    """Peaks of resident memory by process kind, and when each metrics.jsonl row first appeared."""

    server_mb: float = 0.0
    actors_mb: float = 0.0
    tree_mb: float = 0.0
    actors: int = 0
    row_times: list[float] = field(default_factory=list)

    def sample(self, root_pid: int, out: Path, t0: float) -> None:
        server = actors = tree = 0.0
        count = 0
        commands: dict[int, str] = {}
        for pid in process_tree(root_pid):  # parents first
            cmd = commands[pid] = cmdline(pid)
            if commands.get(parent(pid)) == cmd:  # forked, not yet exec'd: its pages are its parent's
                continue
            mb = rss_mb(pid)
            tree += mb
            if "flwr-simulation" in cmd:
                server += mb
            elif cmd.startswith("ray::ClientAppActor"):
                actors += mb
                count += 1
        self.server_mb, self.actors_mb = max(self.server_mb, server), max(self.actors_mb, actors)
        self.tree_mb, self.actors = max(self.tree_mb, tree), max(self.actors, count)
        rows = sum(1 for _ in metrics_rows(out))
        while len(self.row_times) < rows:
            self.row_times.append(time.monotonic() - t0)


def metrics_rows(out: Path) -> list[dict]:
    """The rows so far of the run launched into `out` (none before its first round); after a restart with fresh
    actors (`rounds.restarts`), the continuation's folder, which holds the whole run, has the most."""
    return max((read_metrics(run) for run in run_dirs(out)), key=len, default=[])


def align_per_class(clients: int, max_clients: int) -> int:
    """D_align per class that leaves `IMAGES_PER_CLIENT` images to each of `clients` in a dataset made for
    `max_clients`."""
    return ALIGN_PER_CLASS + (max_clients - clients) * IMAGES_PER_CLIENT // CLASSES


def run_once(clients: int, max_clients: int, sampled: int, rounds: int, data: Path, out: Path, extra: str) -> dict:
    """One launch; its figures (see the module docstring)."""
    sizes = {
        "data-dir": str(data),
        "num-clients": clients,
        "align-per-class": align_per_class(clients, max_clients),
        "fraction-train": sampled / clients,
        "num-server-rounds": rounds,
    }
    watch, t0 = Watch(), time.monotonic()
    ok = launch_run(out, SETTINGS, extra, sizes, watch=lambda pid: watch.sample(pid, out, t0))
    wall = time.monotonic() - t0
    if not ok:
        sys.exit(failure(out, f"the run with {clients} clients"))
    rows = metrics_rows(out)
    later = [r["seconds"] for r in rows if r["round"] >= 2]
    per_round = statistics.fmean(later)
    return {
        "clients": clients,
        "sampled": sampled,
        "start-up s": watch.row_times[1] - per_round,
        "round s": per_round,
        "server peak MB": watch.server_mb,
        "actors peak MB": watch.actors_mb,
        "tree peak MB": watch.tree_mb,
        "actors": watch.actors,
        "wall s": wall,
        "round seconds": [r["seconds"] for r in rows if r["round"] >= 1],
    }


FIGURES = ("start-up s", "round s", "server peak MB", "actors peak MB", "tree peak MB", "wall s")
TIMES = ("start-up s", "round s", "wall s")


def best(runs: list[dict]) -> dict:
    """One figure set from repeated runs of one size: the least disturbed (shortest) times, the highest peaks."""
    out = dict(runs[-1])
    for key in FIGURES:
        values = [r[key] for r in runs]
        out[key] = min(values) if key in TIMES else max(values)
    return out


def table(results: list[dict]) -> str:
    """Figures side by side, with the ratio of the last run to the first."""
    first, last = results[0], results[-1]
    names = " | ".join(f"{r['clients']} clients" for r in results)
    lines = [f"| figure | {names} | ratio {last['clients']}/{first['clients']} |", "|---" * (len(results) + 2) + "|"]
    for key in FIGURES:
        cells = " | ".join(f"{r[key]:.1f}" if isinstance(r[key], float) else str(r[key]) for r in results)
        lines.append(f"| {key} | {cells} | {last[key] / first[key]:.2f} |")
    lines.append(f"| actor processes at once (most) | {' | '.join(str(r['actors']) for r in results)} | |")
    return "\n".join(lines)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine slows both runs."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--run-config", default="", help="more overrides for every run, 'k=v ...'")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per size, interleaved (100, 1000, 100, ...); see `best`"
    )
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("--rounds must be at least 2: round 1 carries the start-up costs")
    runs: dict[int, list[dict]] = {clients: [] for clients in args.clients}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        data = Path(tmp) / "data"
        images = write_dataset(data, max(args.clients))
        print(f"dataset: {images} train images of {SIDE}x{SIDE} in {data}", flush=True)
        for repeat in range(args.repeats):
            for clients in args.clients:
                out = Path(tmp) / f"run-{clients}-{repeat}"
                out.mkdir()
                print(f"load average before the {clients}-client run: {load_average()}", flush=True)
                runs[clients].append(
                    run_once(clients, max(args.clients), args.sampled, args.rounds, data, out, args.run_config)
                )
                print(json.dumps(runs[clients][-1]), flush=True)
    print(table([best(runs[clients]) for clients in args.clients]))


if __name__ == "__main__":
    main()

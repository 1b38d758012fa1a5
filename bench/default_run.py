"""Peak memory, wall time and final accuracy of the offline default run (what `make run` does), today's
configuration beside the new default.

Two runs of the same run config, one after the other:

- today: the configuration before the default was brought within 4 GiB: the launcher runs its checks in its
  own process (`bench.launch_in_process`), so torch and the checks' data stay in it for the whole run, and
  each client actor gets 1 CPU (`--federation-config client-resources-num-cpus=1`: 2 actors on 2 cores);
- new: `python -m server_app.launch` as `make run` starts it: the checks in a child process that ends before
  the SuperLink starts (`server_app.apart`), and 2 CPUs per client actor (pyproject's simulation federation:
  1 actor on 2 cores).

Memory is resident memory (VmRSS from /proc, in MiB) summed over the launcher's whole process tree: the
launcher and its checks' child, the watchdog, the SuperLink, the SuperExec, the `flwr run` CLI, the simulation
process (ServerApp, Flower's simulation engine, Ray driver), the Ray ClientApp actors and Ray's own processes
(GCS, raylet, dashboard in its minimal mode, dashboard and runtime-env agents, monitors), sampled every 0.2 s.
Pages shared between processes (torch's libraries) count once per process, as a sum of RSS does. The table
gives each kind's memory at the moment of the peak sum, and how many processes of that kind there were.

Usage: python -m bench.default_run [--run-config "k=v ..."]   (e.g. "num-server-rounds=3" for a short look)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.runs import LAUNCHER, failure, launch_run, run_dirs
from flcore.reports import read_summary
from server_app.watchdog import process_tree

# (kind, a piece of the command line that names it), first match wins; the launcher is the tree's root
KINDS = (
    ("launcher's checks (child)", ""),  # the root's own command line, in a child: see `kind`
    ("watchdog", "server_app.watchdog"),
    ("SuperLink", "flower-superlink"),
    ("SuperExec", "flower-superexec"),
    ("flwr CLI", "bin/flwr "),
    ("simulation (ServerApp, Ray driver)", "flwr-simulation"),
    ("ClientApp actors", "ray::ClientAppActor"),
)
LAUNCHER_KIND, RAY_KIND = "launcher", "Ray's own processes"
ORDER = (LAUNCHER_KIND, *(name for name, _ in KINDS), RAY_KIND)


@dataclass(frozen=True)
class Setup:
    name: str
    launcher: str
    federation: str


TODAY = Setup("today", "bench.launch_in_process", "client-resources-num-cpus=1")
NEW = Setup("new default", LAUNCHER, "")


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kind(pid: int, root: int, command: str, root_command: str) -> str:
    """Which part of the run a process is; anything under the root not named in KINDS is Ray's."""
    if pid == root:
        return LAUNCHER_KIND
    if command == root_command:
        return KINDS[0][0]
    return next((name for name, piece in KINDS[1:] if piece in command), RAY_KIND)


@dataclass
class Peak:
    """The largest summed RSS seen, and each kind's memory and process count at that moment."""

    total: float = 0.0
    by_kind: dict[str, float] = field(default_factory=dict)
    count: Counter = field(default_factory=Counter)

    def sample(self, root: int) -> None:
        root_command = cmdline(root)
        by_kind: dict[str, float] = {}
        count: Counter = Counter()
        for pid in process_tree(root):
            name = kind(pid, root, cmdline(pid), root_command)
            by_kind[name] = by_kind.get(name, 0.0) + rss_mib(pid)
            count[name] += 1
        total = sum(by_kind.values())
        if total > self.total:
            self.total, self.by_kind, self.count = total, by_kind, count


@dataclass(frozen=True)
class Outcome:
    setup: Setup
    peak: Peak
    wall: float
    summary: dict


def measure(setup: Setup, run_config: str) -> Outcome:
    peak = Peak()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        ok = launch_run(out, run_config, federation=setup.federation, watch=peak.sample, launcher=setup.launcher)
        wall = time.perf_counter() - start
        if not ok:
            sys.exit(failure(out, f"the {setup.name} run"))
        summary = read_summary(run_dirs(out, finished=True)[-1])
    return Outcome(setup, peak, wall, summary)


def table(today: Outcome, new: Outcome) -> str:
    """Markdown: each kind's MiB at the peak (with its process count), the peak, its ratio, time and accuracy."""

    def cell(o: Outcome, name: str) -> str:
        mib = o.peak.by_kind.get(name, 0.0)
        return f"{mib:,.0f} ({o.peak.count[name]})" if o.peak.count[name] else "–"

    lines = [
        f"| MiB at the peak (processes) | {today.setup.name} | {new.setup.name} |",
        "|---|---|---|",
        *(f"| {name} | {cell(today, name)} | {cell(new, name)} |" for name in ORDER),
        f"| **peak summed RSS** | **{today.peak.total:,.0f}** | **{new.peak.total:,.0f}** |",
        f"| ratio new / today | | {new.peak.total / today.peak.total:.2f} |",
        f"| within 4 GiB (4,096 MiB) | {'yes' if today.peak.total <= 4096 else 'no'} | "
        f"{'yes' if new.peak.total <= 4096 else 'no'} |",
        f"| wall time s | {today.wall:.1f} | {new.wall:.1f} |",
    ]
    for key in ("accuracy", "balanced-accuracy"):
        lines.append(f"| final {key} | {today.summary['final'][key]:.3f} | {new.summary['final'][key]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.default_run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-config", default="", help="overrides for both runs, e.g. 'num-server-rounds=3'")
    args = parser.parse_args()
    today = measure(TODAY, args.run_config)
    new = measure(NEW, args.run_config)
    print(table(today, new))


if __name__ == "__main__":
    main()

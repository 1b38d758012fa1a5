"""One real run of the app and the folders it leaves: the job every benchmark repeats, written once.

A benchmark measures the app as a user runs it: `python -m server_app.launch` in a process of its own
(SuperLink, Ray and the ServerApp included) with the bench's overrides, writing into a folder the bench
chose, its console output kept in `launch.log` there. The figures are read back from the run's folder
(`<output-dir>/<run-id>/`) with `flcore.reports.read_metrics` and `read_summary`, the readers beside the
writer that the tests use too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flcore.reports import METRICS, SUMMARY
from flcore.run_config import format_overrides

ROOT = Path(__file__).resolve().parent.parent  # the project, where the launcher runs
LOG = "launch.log"  # in the output-dir, beside the run folders
POLL_S = 0.2  # seconds between two calls of a launch's `watch`
LAUNCHER = "server_app.launch"  # the module a run is launched with
TAIL_LINES = 30

RunConfig = str | Path | Mapping[str, object]


def run_config_text(config: RunConfig) -> str:
    """One `--run-config` value: a TOML file's path or 'k=v ...' text as given, a mapping as 'k=v' pairs with
    TOML values (`format_overrides`), which the launcher reads back as the same values."""
    if isinstance(config, Mapping):
        return format_overrides(config)
    return str(config)


@dataclass(frozen=True)
class Slot:
    """Where one of several concurrent runs computes: its own CPU cores and, on a GPU machine, the GPU(s) it sees.

    Children inherit the cores (Ray's workers included), and `flcore.device.cpu_share` reads them, so each run
    sizes its threads to its slot instead of every run taking every core."""

    cores: frozenset[int]
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES for the run; None leaves the environment's as it is

    def env(self) -> dict[str, str]:
        return {**os.environ, **({"CUDA_VISIBLE_DEVICES": self.gpus} if self.gpus is not None else {})}

    def enter(self) -> None:
        """Pin the calling (child) process to the slot's cores; runs between fork and exec."""
        os.sched_setaffinity(0, self.cores)


def slots(jobs: int, cores: Sequence[int] | None = None, gpus: int = 0) -> list[Slot]:
    """`jobs` disjoint shares of this process's cores (as even as they split), each with one GPU when there are at
    least as many GPUs as jobs, else GPUs dealt round-robin (runs sharing a GPU, each with its own cores)."""
    owned = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if not 1 <= jobs <= len(owned):
        raise ValueError(
            f"--jobs {jobs}: expected 1..{len(owned)}, one core or more per job (this process has {len(owned)})"
        )
    shares = [frozenset(owned[i::jobs]) for i in range(jobs)]
    return [Slot(share, str(i % gpus) if gpus else None) for i, share in enumerate(shares)]


def launch_command(out_dir: Path, *configs: RunConfig, federation: str = "", launcher: str = LAUNCHER) -> list[str]:
    """The launcher's argv: each non-empty config as a `--run-config` (later ones win), `output-dir` last so
    the run writes where the bench looks, then the client resources (`--federation-config`) when given;
    `launcher`: a module taking the launcher's arguments (a bench's variant of it)."""
    texts = [text for text in map(run_config_text, configs) if text]
    texts.append(run_config_text({"output-dir": str(out_dir)}))
    command = [sys.executable, "-m", launcher]
    for text in texts:
        command += ["--run-config", text]
    return command + (["--federation-config", federation] if federation else [])


def launch_run(
    out_dir: Path,
    *configs: RunConfig,
    federation: str = "",
    watch: Callable[[int], None] | None = None,
    slot: Slot | None = None,
    launcher: str = LAUNCHER,
) -> bool:
    """One real run into `out_dir` (created if missing), its console output in `out_dir/launch.log`; True when
    the launcher says the run completed.

    `watch(pid)`, when given, is called with the launcher's pid every `POLL_S` seconds while the run goes:
    memory sampling over its process tree, or noting when metrics rows appear. A `slot` confines the run to its
    cores and GPUs, so runs launched side by side do not compete for the same ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / LOG).open("w") as log:
        proc = subprocess.Popen(
            launch_command(out_dir, *configs, federation=federation, launcher=launcher),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if slot is None else slot.env(),
            preexec_fn=None if slot is None else slot.enter,
        )
        try:
            while watch is not None and proc.poll() is None:
                watch(proc.pid)
                time.sleep(POLL_S)
            return proc.wait() == 0
        except BaseException:  # interrupted: the launcher's watchdog stops what it started
            proc.kill()
            raise


def failure(out_dir: Path, what: str) -> str:
    """Why a bench stops: which run failed and the end of its log, shown here since `out_dir` may be a
    temporary folder that goes with the bench."""
    tail = (out_dir / LOG).read_text(errors="replace").splitlines()[-TAIL_LINES:]
    return "\n".join([f"{what} failed; the end of {out_dir / LOG}:", *tail])


def run_dirs(out_dir: Path, finished: bool = False) -> list[Path]:
    """The runs launched into `out_dir` (`<output-dir>/<run-id>/`) that logged a round, in name order; with
    `finished`, only those that completed (wrote summary.json)."""
    return sorted(path.parent for path in Path(out_dir).glob(f"*/{SUMMARY if finished else METRICS}"))

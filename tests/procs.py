"""Process-tree helpers for tests that start real Flower processes: nothing may outlive a test."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server_app import watchdog
from tests.helpers import run_config

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc), so a test can kill -9 a whole run, SuperLink and Ray too."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def still_running(recorded: dict[int, int], within: float) -> list[int]:
    """The recorded processes (pid: start time) still alive after waiting up to `within` seconds for them to end."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [pid for pid, started in recorded.items() if watchdog._same(pid, started)]
        if not left:
            return []
        time.sleep(0.1)
    return left


class Recorder(threading.Thread):
    """Records every process below `pid` (and their re-parented descendants) while a real run goes on."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.recorded, self.done = pid, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            watchdog.record([self.pid], self.recorded)
        self.recorded.pop(self.pid, None)

    def stop(self) -> None:
        self.done.set()
        self.join()

    def names(self) -> str:
        return " ".join(
            Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:60] for p in self.recorded if watchdog.alive(p)
        )


def launcher(out: Path, values: Mapping[str, Any]) -> subprocess.Popen:
    """The launcher in a process group of its own, with `values` writing under `out`; its output in out/launch.log."""
    cmd = [sys.executable, "-m", "server_app.launch", "--run-config", run_config({**values, "output-dir": str(out)})]
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "launch.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

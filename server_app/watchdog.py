"""Nothing a run started outlives its launcher: the process-tree helpers, and a watchdog process.

The launcher starts the SuperLink in a session of its own, and the SuperLink's SuperExec, the
simulation and Ray's workers start sessions of their own too. So killing the launcher's process group
(`kill -9 -<pgid>`, a closed terminal, a CI timeout) reaches none of them; and when a simulation ends
normally its Ray workers are re-parented to init and keep running for about a minute, out of reach of a
process-tree walk from the SuperLink.

`Watchdog.start(roots)` runs `python -m server_app.watchdog <pids>` in a session of its own. It holds the
read end of a pipe whose write end only the launcher holds, and records every process under the roots
(pid and start time, so a reused pid is never mistaken for one of ours) four times a second, following
re-parented descendants. When the pipe closes, because the launcher closed it at the end of the run or
because the launcher died (the kernel closes a dead process's files, kill -9 included), it sends SIGTERM
to every recorded process still alive, SIGKILL to what remains after a grace period, and exits; the
launcher waits for it, so the command returns only once everything is gone. A launcher that starts more
processes later (`deploy.local_cluster`'s SuperNodes) hands each to the watchdog as a further root
(`Watchdog.add`: its pid, one line on the same pipe).

`exit_on_signals` makes SIGTERM and SIGINT unwind the launcher's `finally` blocks and context managers,
which stop what it started at once; the default action would only leave that to the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

POLL = 0.25
GRACE = 5.0
PROJECT = Path(__file__).resolve().parent.parent


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc), parents first."""
    children = _children()
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"


def _same(pid: int, started: int) -> bool:
    """The process `pid` is still the one recorded with start time `started`, and not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[1] != "Z"


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a process and everything it started; SIGKILL what is still alive after `grace` seconds.

    Returns once every process of the tree is gone (signals are delivered asynchronously, so it waits).
    """
    tree = {pid: stat[2] for pid in process_tree(proc.pid) if (stat := _stat(pid)) is not None}
    end_processes(tree, grace, reap=proc.poll)


def end_processes(recorded: Mapping[int, int], grace: float = GRACE, reap=lambda: None) -> None:
    """SIGTERM every recorded (pid, start time) still alive, children first; SIGKILL the rest after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in reversed(list(recorded.items())):
            if _same(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            reap()  # our own child would otherwise linger as a zombie
            if not any(_same(pid, started) for pid, started in recorded.items()):
                return
            time.sleep(0.05)


def record(roots: Iterable[int], recorded: dict[int, int]) -> None:
    """Add the roots and every living descendant of a recorded process to `recorded` (pid -> start time)."""
    children = _children()
    stack = [pid for pid in [*roots, *recorded] if (pid not in recorded or _same(pid, recorded[pid]))]
    while stack:
        pid = stack.pop()
        if pid not in recorded and (stat := _stat(pid)) is not None:
            recorded[pid] = stat[2]
        stack.extend(child for child in children.get(pid, []) if child not in recorded)


def watch(roots: Sequence[int], until: threading.Event) -> dict[int, int]:
    """Record the trees under `roots` until `until` is set; then end every recorded process. `roots` may grow
    meanwhile (pids the launcher sends later)."""
    recorded: dict[int, int] = {}
    record(roots, recorded)
    while not until.wait(POLL):
        record(roots, recorded)
    record(roots, recorded)
    recorded.pop(os.getpid(), None)
    end_processes(recorded)
    return recorded


class Watchdog:
    """The launcher's handle on its watchdog process: closing it (or dying) ends the recorded processes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def add(self, pid: int) -> None:
        """Watch `pid`'s tree too (a process the launcher started after the watchdog)."""
        self.proc.stdin.write(f"{pid}\n".encode())
        self.proc.stdin.flush()

    @classmethod
    def start(cls, roots: Sequence[int]) -> Watchdog:
        cmd = [sys.executable, "-m", "server_app.watchdog", *map(str, roots)]
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdin=subprocess.PIPE, start_new_session=True)
        return cls(proc)

    def close(self, timeout: float = 60.0) -> None:
        """End everything recorded, and return once the watchdog has done so."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM, and SIGINT even where a background shell ignores it, raise SystemExit in the main thread."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)


def main(argv: Sequence[str]) -> int:
    closed = threading.Event()
    roots = [int(pid) for pid in argv]

    def read_roots_until_eof() -> None:
        for line in sys.stdin.buffer:
            if line.strip().isdigit():
                roots.append(int(line))
        closed.set()

    threading.Thread(target=read_roots_until_eof, daemon=True).start()
    watch(roots, closed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

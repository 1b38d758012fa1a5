"""Nothing a run starts outlives the launcher: not after kill -9 of its process group, not after a normal end
(the full run of tests/test_simulation.py checks that one)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_app import watchdog
from tests.helpers import TINY
from tests.procs import Recorder, launcher, still_running

ROOT = Path(__file__).resolve().parent.parent

# A stand-in launcher: a tree in other sessions (as the SuperLink's), one process orphaned after 1 s (as Ray's
# workers are when the simulation exits), and the watchdog on it.
FAKE_LAUNCHER = """
import subprocess, sys, time
from server_app.watchdog import Watchdog
script = "setsid sleep 300 & echo $! >> {pids}; (setsid sleep 300 & echo $! >> {pids}; sleep 1) & sleep 300"
root = subprocess.Popen(["bash", "-c", script], start_new_session=True)
with open("{pids}", "a") as f:
    f.write(f"{{root.pid}}\\n")
Watchdog.start([root.pid])
time.sleep(300)
"""


def identities(pids) -> dict[int, int]:
    return {pid: stat[2] for pid in pids if (stat := watchdog._stat(pid)) is not None}


def test_kill_9_of_the_launchers_group_ends_its_other_sessions_and_orphans(tmp_path):
    pids = tmp_path / "pids"
    code = FAKE_LAUNCHER.format(pids=pids)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while (not pids.exists() or len(pids.read_text().split()) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the second sleep is an orphan now
        started = identities(int(p) for p in pids.read_text().split())
        assert len(started) == 3
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        assert still_running(started, within=15) == []
    finally:
        watchdog.end_processes(identities([launcher.pid, *map(int, pids.read_text().split())]), grace=1)


def test_at_a_normal_end_the_watchdog_ends_what_the_run_left_orphaned(tmp_path):
    """As Ray's workers when the simulation exits: an orphan no walk from the SuperLink's tree can find."""
    pids = tmp_path / "pids"
    root = subprocess.Popen(["bash", "-c", f"(setsid sleep 300 & echo $! >> {pids}; sleep 1) & sleep 2"])
    dog = watchdog.Watchdog.start([root.pid])
    try:
        root.wait(timeout=20)
        orphan = identities(int(p) for p in pids.read_text().split())
        watchdog.stop(root)  # all the launcher could do before: its tree is empty by now
        assert len(orphan) == 1 and still_running(orphan, within=0.5) == list(orphan)
        dog.close()
        assert dog.proc.returncode == 0 and still_running(orphan, within=10) == []
    finally:
        watchdog.end_processes(identities(int(p) for p in pids.read_text().split()), grace=1)


@pytest.mark.slow
def test_kill_9_of_a_real_launch_leaves_no_superlink_simulation_or_ray(tmp_path):
    proc = launcher(tmp_path, TINY)
    recorder = Recorder(proc.pid)
    recorder.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "ClientAppActor" not in recorder.names():
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-2000:]
            time.sleep(0.5)
        assert "ClientAppActor" in recorder.names()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(0.5)
        recorder.done.set()
        recorder.join()
        assert still_running(recorder.recorded, within=30) == [], recorder.names()
    finally:
        recorder.done.set()
        watchdog.end_processes(recorder.recorded, grace=2)

"""Nothing a run starts outlives the launcher: not after kill -9 of its process group, not after a normal end
(the full run of tests/test_simulation.py checks that one)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_app import watchdog
from tests.helpers import TINY, run_config
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


# A stand-in `deploy.local_cluster`: the real LocalCluster, whose SuperLink and SuperNodes are processes in
# sessions of their own that leave an orphan each (as Flower's ClientApps and Ray's workers can).
FAKE_CLUSTER = """
import subprocess, time
from pathlib import Path
from deploy import local_cluster
from server_app import launch
from server_app.watchdog import exit_on_signals

def process(*args, **kwargs):
    script = "(setsid sleep 300 & echo $! >> {pids}; sleep 1) & echo $$ >> {pids}; sleep 300"
    return subprocess.Popen(["bash", "-c", script], start_new_session=True)

launch.start_superlink = process
launch.start_process = process
exit_on_signals()
cluster = local_cluster.LocalCluster(Path("{workdir}"), 2, tls=False, auth=False)
cluster.wait_for_nodes = lambda count, timeout=120: None
with cluster:
    Path("{pids}.ready").touch()
    time.sleep(300)
"""


@pytest.mark.parametrize("how", ["kill -9 of its group", "SIGTERM"])
def test_nothing_local_cluster_started_outlives_it(tmp_path, how):
    pids = tmp_path / "pids"
    code = FAKE_CLUSTER.format(pids=pids, workdir=tmp_path / "cluster")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cluster = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{pids}.ready").exists() and time.monotonic() < deadline:
            assert cluster.poll() is None
            time.sleep(0.05)
        time.sleep(1.5)  # every orphan is re-parented by now, and the watchdog has recorded it
        started = identities(int(p) for p in pids.read_text().split())
        assert len(started) == 6  # SuperLink and 2 SuperNodes, and an orphan of each
        if how == "SIGTERM":
            cluster.send_signal(signal.SIGTERM)
        else:
            os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait(timeout=60)
        assert still_running(started, within=15) == []
    finally:
        watchdog.end_processes(identities([cluster.pid, *map(int, pids.read_text().split())]), grace=1)


def running(recorder: Recorder, name: str) -> bool:
    """Whether a recorded process still alive has `name` in its whole command line."""
    for pid in list(recorder.recorded):
        with contextlib.suppress(OSError):
            if watchdog.alive(pid) and name in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "):
                return True
    return False


@pytest.mark.slow
def test_kill_9_of_a_real_local_cluster_at_round_1_leaves_no_flower_process(tmp_path):
    cmd = [sys.executable, "-m", "deploy.local_cluster", "--insecure", "--nodes", "2", "--workdir", str(tmp_path)]
    cmd += ["--run-config", run_config({**TINY, "num-clients": 2, "output-dir": str(tmp_path / "out")})]
    log = (tmp_path / "cluster.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    recorder = Recorder(proc.pid)
    recorder.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not running(recorder, "flwr-clientapp"):  # round 1 is training
            assert proc.poll() is None, (tmp_path / "cluster.log").read_text()[-2000:]
            time.sleep(0.5)
        assert running(recorder, "flwr-clientapp")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(0.5)
        recorder.done.set()
        recorder.join()
        assert still_running(recorder.recorded, within=30) == [], recorder.names()
    finally:
        recorder.done.set()
        watchdog.end_processes(recorder.recorded, grace=2)

"""One full run through the real ServerApp and ClientApp: `flwr run` on a local SuperLink with Ray, and nothing
it started is left when the launcher returns (tests/test_processes.py kills a run mid-way)."""

import json

import pytest

from flcore.reports import read_metrics, read_summary
from server_app import watchdog
from tests.helpers import run_folder
from tests.procs import Recorder, launcher, still_running

RUN = {
    "num-clients": 4,
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "local-epochs": 2,
    "dirichlet-alpha": 100.0,
    "imbalance-factor": 2.0,
    "eval-every": 2,
}


@pytest.mark.slow
def test_full_simulation_learns_writes_reports_and_leaves_no_process(tmp_path):
    proc = launcher(tmp_path, RUN)
    recorder = Recorder(proc.pid)
    recorder.start()
    try:
        assert proc.wait(timeout=600) == 0, (tmp_path / "launch.log").read_text()[-2000:]
        recorder.stop()
        assert len(recorder.recorded) >= 4  # SuperLink, SuperExec, simulation, Ray, watchdog, ...
        assert still_running(recorder.recorded, within=0.5) == [], recorder.names()
    finally:
        recorder.done.set()
        watchdog.end_processes(recorder.recorded, grace=2)
    assert "finished:completed" in (tmp_path / "launch.log").read_text()
    run_dir = run_folder(tmp_path)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 2, 3]  # round 0, every 2nd, and always the last
    assert all(r["replies"] == 4 for r in rows[1:])
    summary = read_summary(run_dir)
    assert summary["final"]["accuracy"] > 0.3  # chance is 0.1 on ten digit classes
    assert summary["final"]["accuracy"] > rows[0]["accuracy"]
    partition = json.loads((run_dir / "partition.json").read_text())
    assert len(partition["clients"]) == 4 and sum(map(sum, partition["clients"])) == summary["pool-size"]
    for name in ("config.json", "partition.png", "curves.png", "confusion.png", "model.pt"):
        assert (run_dir / name).is_file()

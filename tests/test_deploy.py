"""A real deployment on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication (deploy/local_cluster.py)."""

import json
import subprocess
import sys
import time

import pytest

from deploy.local_cluster import LocalCluster
from server_app import launch


def test_client_side_never_imports_clip_or_the_llm():
    code = (
        "import sys, client_app.app; "
        "print([m for m in ('open_clip', 'transformers', 'datasets', 'ray') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=launch.PROJECT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_tls_cluster_with_node_auth_runs_two_rounds_above_chance(tmp_path):
    overrides = {
        "num-clients": 3,
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "local-epochs": 2,
        "image-size": 16,
        "imbalance-factor": 2.0,
        "dirichlet-alpha": 100.0,
        "output-dir": str(tmp_path / "out"),
    }
    cfg, sent = launch.resolve(overrides, launch.project_settings()[0])
    with LocalCluster(tmp_path / "cluster", 3, tls=True, auth=True) as cluster:
        config = (cluster.home / "config.toml").read_text()
        assert "root-certificates" in config and "insecure" not in config
        assert "--enable-supernode-auth" in cluster.link.args and "--insecure" not in cluster.link.args
        status = cluster.run(sent, timeout=600)
    assert status["status"] == "finished:completed", status
    (run_dir,) = (tmp_path / "out").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["replies"] == 3
    assert summary["final"]["accuracy"] > 0.2, summary["final"]  # chance is 0.1 on ten digit classes
    assert all(p.poll() is not None for p in [cluster.link, *cluster.procs])
    print(f"TLS + auth cluster: 3 SuperNodes, 2 rounds, accuracy {summary['final']['accuracy']:.3f}")


@pytest.mark.slow
def test_unregistered_supernode_is_refused(tmp_path):
    with LocalCluster(tmp_path / "cluster", 1, tls=True, auth=True) as cluster:
        intruder = cluster.start_supernode(7, register=False)  # has a key, but the SuperLink never saw it
        deadline = time.time() + 120
        while intruder.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert intruder.poll() not in (None, 0)
        assert cluster.online_nodes() == 1
    log = (tmp_path / "cluster" / "node7" / "supernode.log").read_text()
    assert "Failed to activate SuperNode" in log

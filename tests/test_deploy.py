"""A real deployment on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication (deploy/local_cluster.py)."""

import contextlib
import json
import subprocess
import sys
import time

import pytest

from deploy.local_cluster import LocalCluster
from flcore.reports import read_metrics, read_summary
from server_app import launch


def test_client_side_never_imports_clip_or_the_llm():
    code = (
        "import sys, client_app.app; "
        "print([m for m in ('open_clip', 'transformers', 'datasets', 'ray') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=launch.PROJECT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


LOCAL_ROUND = """
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for name in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, name, 1)
from client_app.app import train_fn
from flcore.config import validate
from flcore.datasets import DIGIT_NAMES
from flcore.models import build_model
from flcore.models import run_model
root = Path(sys.argv[1])
for c in ("zero", "seven"):
    (root / c).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
cfg = validate({"client-data": "local", "local-epochs": 1}, paths=False)
model = run_model(cfg, 10, seed=0)
config = ConfigRecord({"server-round": 1, "classes": list(DIGIT_NAMES)})
msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}), 1, "train")
reply = train_fn(msg, Context(1, 1, {"data-dir": str(root)}, RecordDict(), dict(cfg)))
print(json.dumps({"examples": reply.content["metrics"]["num-examples"],
                  "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_a_local_data_client_round_imports_only_the_client_installs_closure(tmp_path):
    """The import closure of a ClientApp round on a node's own folder against what `pip install ".[client]"`
    installs (a fresh venv per test would reinstall torch: minutes). Every module the round imports is the
    standard library's, this project's client side (flcore, client_app), or of a distribution in the closure
    of the client extra's requirements; none is of the server side."""
    from deploy.client_install import CLIENT, FULL, closure, module_distributions, requirements

    run = [sys.executable, "-c", LOCAL_ROUND, str(tmp_path / "mine")]
    out = subprocess.run(run, cwd=launch.PROJECT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["examples"] == 6
    modules = set(result["modules"])
    client, full = closure(requirements(CLIENT)), closure(requirements(FULL))
    assert {"transformers", "open-clip-torch", "ray"} <= full - client  # the server side, outside the client's
    owners = module_distributions()
    project = {"flcore", "client_app", "strategies", "rounds", "server_app", "alignment", "pretrain", "deploy"}
    assert modules & project == {"flcore", "client_app"}
    foreign = {
        m: sorted(owners[m])
        for m in modules - project - set(sys.stdlib_module_names)
        if m in owners and not owners[m] & client
    }
    assert not foreign, f"the client round imports modules outside the client install: {foreign}"
    assert not modules & {"transformers", "open_clip", "ray", "matplotlib", "timm"}


def still_running(procs: list[subprocess.Popen], grace: float = 30.0) -> list:
    """The processes that have not ended `grace` seconds after the cluster stopped them (a loaded machine
    delivers the last SIGKILL late), named by their command."""
    alive = []
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        if proc.poll() is None:
            alive.append(proc.args[:2])
    return alive


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
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["replies"] == 3
    assert summary["final"]["accuracy"] > 0.2, summary["final"]  # chance is 0.1 on ten digit classes
    assert not still_running([cluster.link, *cluster.procs])
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


@pytest.mark.slow
def test_tls_cluster_of_nodes_with_their_own_folders_reports_counts_only(tmp_path):
    """Three SuperNodes (TLS, node authentication), each with its own folder of different classes and sizes; the
    server's D_align is a folder of its own. The folders reach only the nodes' node config."""
    from tests.test_local_data import CLASSES, write_images

    layouts = [{"zero": 12, "one": 6}, {"two": 9, "three": 9, "four": 3}, {"five": 20}]
    folders = [tmp_path / "nodes" / f"site{i}" for i in range(3)]
    for folder, layout in zip(folders, layouts, strict=True):
        write_images(folder, layout)
    write_images(tmp_path / "server-align", dict.fromkeys(CLASSES, 5), offset=60)
    overrides = {
        "client-data": "local",
        "num-clients": 3,
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "local-epochs": 1,
        "image-size": 8,
        "align-data": str(tmp_path / "server-align"),
        "output-dir": str(tmp_path / "out"),
    }
    cfg, sent = launch.resolve(overrides, launch.project_settings()[0])
    started = time.perf_counter()
    with LocalCluster(tmp_path / "cluster", 3, tls=True, auth=True, node_data=folders) as cluster:
        status = cluster.run(sent, timeout=600)
    wall = time.perf_counter() - started
    assert status["status"] == "finished:completed", status
    (run_dir,) = (tmp_path / "out").iterdir()
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    assert [r["replies"] for r in rows[1:]] == [3, 3]
    sizes = {f"node{i}": sum(layout.values()) for i, layout in enumerate(layouts)}
    assert {k: v["num-examples"] for k, v in summary["node-data"].items()} == sizes  # each trained on its own
    assert summary["node-data"]["node2"]["class-counts"] == [0, 0, 0, 0, 0, 20, 0, 0, 0, 0]
    assert summary["align-size"] == 50 and summary["pool-size"] == sum(sizes.values())
    server_side = [(cluster.home / "run-config.toml").read_text(), (cluster.home / "superlink.log").read_text()]
    server_side += [p.read_text() for p in run_dir.iterdir() if p.suffix in (".json", ".jsonl")]
    assert not any(str(tmp_path / "nodes") in text or "site0" in text for text in server_side)
    for i, folder in enumerate(folders):  # the node's operator sees what it trained on in its own log
        log = (tmp_path / "cluster" / f"node{i}" / "supernode.log").read_text()
        assert f"local data {folder.resolve()}: {sizes[f'node{i}']} images" in log
    print(f"TLS + auth cluster, 3 nodes with their own folders, 2 rounds: {wall:.0f} s wall")

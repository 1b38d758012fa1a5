"""One full run through the real ServerApp and ClientApp: `flwr run` on a local SuperLink with Ray."""

import json

import pytest

from flcore.reports import read_metrics, read_summary
from server_app import launch


@pytest.mark.slow
def test_full_simulation_learns_and_writes_reports(tmp_path, capsys):
    overrides = (
        "num-clients=4 num-server-rounds=3 fraction-train=1.0 local-epochs=2 dirichlet-alpha=100.0 "
        f"imbalance-factor=2.0 eval-every=2 output-dir={tmp_path}"
    )
    assert launch.main(["--run-config", overrides]) == 0
    assert "finished:completed" in capsys.readouterr().out
    (run_dir,) = list(tmp_path.iterdir())
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

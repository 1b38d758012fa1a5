"""The long-tailed methods published after the paper (FedETF, FedYoYo), one tiny run each through `flwr run` (the
launcher): 2 rounds, 4 clients, digits at 8 px, random-weight ResNet-8."""

import pytest

from flcore.reports import read_metrics, read_summary
from server_app import launch
from tests.helpers import TINY, run_config


def run_one(tmp_path, name: str, overrides: str) -> tuple[list[dict], dict]:
    out = tmp_path / name
    every_client = run_config({**TINY, "fraction-train": 1.0, "output-dir": str(out)})
    assert launch.main(["--run-config", every_client, "--run-config", overrides]) == 0
    (run_dir,) = list(out.iterdir())
    return read_metrics(run_dir), read_summary(run_dir)


@pytest.mark.slow
def test_fedetf_runs_through_flwr_run(tmp_path):
    rows, summary = run_one(tmp_path, "fedetf", "strategy=fedetf fedetf-finetune-rounds=1 fedetf-finetune-epochs=1")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["replies"] == 4
    assert rows[-1]["personalized-replies"] == 4 and 0.0 <= rows[-1]["personalized-accuracy"] <= 1.0
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0 and "balanced softmax" in summary["client-runs"]


@pytest.mark.slow
def test_fedloge_runs_through_flwr_run(tmp_path):
    rows, summary = run_one(tmp_path, "fedloge", "strategy=fedloge fedloge-etf-steps=20 fedloge-local-epochs=1")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["replies"] == 4
    assert rows[-1]["personalized-replies"] == 4 and 0.0 <= rows[-1]["personalized-accuracy"] <= 1.0
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0 and "SSE-C" in summary["client-runs"]
    assert summary["fedloge-sse"]["etf-steps"] == 20


@pytest.mark.slow
def test_fedyoyo_runs_through_flwr_run(tmp_path):
    rows, summary = run_one(tmp_path, "fedyoyo", "strategy=fedyoyo")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["replies"] == 4
    assert all(r["yoyo-effective-replies"] == 4 and abs(sum(r["yoyo-prior"]) - 1) < 1e-5 for r in rows[1:])
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0 and "AutoAugment" in summary["client-runs"]

import json

import numpy as np
import torch

from flcore.reports import RunReport


def eval_row(acc):
    return {
        "accuracy": acc,
        "balanced-accuracy": acc,
        "many-accuracy": acc,
        "medium-accuracy": float("nan"),
        "few-accuracy": 0.0,
        "per-class-accuracy": [acc, 0.0],
        "confusion-matrix": [[3, 1], [2, 0]],
    }


def test_report_writes_every_file(tmp_path, capsys):
    cfg = {"output-dir": str(tmp_path), "num-server-rounds": 2, "seed": 1}
    report = RunReport.create(cfg, 42, ["a", "b"])
    report.write_partition(np.array([[3, 0], [1, 2]]), np.array([4, 2]), {"many": [0], "medium": [], "few": [1]})
    report.record_eval(0, eval_row(0.25))
    report.record_train(1, {"train-loss": 1.5})
    report.record_eval(1, eval_row(0.5))
    summary = report.finish({"w": torch.ones(2)})
    out = tmp_path / "42"
    for name in (
        "config.json",
        "partition.json",
        "partition.png",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "confusion.png",
        "model.pt",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["train-loss"] == 1.5
    assert rows[1]["medium-accuracy"] is None  # NaN becomes null: valid JSON
    assert (
        summary["best-accuracy"] == 0.5 and json.loads((out / "summary.json").read_text())["final"]["accuracy"] == 0.5
    )
    assert torch.equal(torch.load(out / "model.pt")["w"], torch.ones(2))
    assert "[round   1/2] loss 1.500 | acc 0.500" in capsys.readouterr().out

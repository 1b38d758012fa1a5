import json

import numpy as np
import pytest
import torch

from flcore.config import validate
from flcore.reports import RunReport, read_metrics, read_summary


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
    cfg = validate({"output-dir": str(tmp_path), "num-server-rounds": 2, "seed": 1})
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
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["train-loss"] == 1.5
    assert rows[1]["medium-accuracy"] is None  # NaN becomes null: valid JSON
    assert summary["best-accuracy"] == 0.5 and read_summary(out)["final"]["accuracy"] == 0.5
    assert torch.equal(torch.load(out / "model.pt")["w"], torch.ones(2))
    assert "[round   1/2] loss 1.500 | acc 0.500" in capsys.readouterr().out


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from flcore.files import atomic_write, write_json

    target = tmp_path / "summary.json"
    write_json(target, {"accuracy": 0.5, "missing": float("nan"), "path": tmp_path})
    assert json.loads(target.read_text()) == {"accuracy": 0.5, "missing": None, "path": str(tmp_path)}

    def half_then_crash(tmp):
        tmp.write_text('{"accur')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text())["accuracy"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_stage_outcomes_become_section_files_summary_entries_and_figures(tmp_path):
    import matplotlib.pyplot as plt
    from flwr.app import ArrayRecord

    from rounds.stage import Outcome

    report = RunReport(tmp_path, 1, ["a", "b"])
    fig, _ = plt.subplots()
    report.take(Outcome(ArrayRecord(), {"pretrain": {"reused": False}}, {"extra.png": fig}))
    report.record_eval(1, eval_row(0.5))
    summary = report.finish({"w": torch.zeros(1)})
    assert summary["pretrain"] == {"reused": False}
    assert json.loads((tmp_path / "pretrain.json").read_text()) == {"reused": False}
    assert (tmp_path / "extra.png").read_bytes().startswith(b"\x89PNG")
    assert fig.number not in plt.get_fignums()  # the report closed the figure it saved

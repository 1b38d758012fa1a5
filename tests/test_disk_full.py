"""A disk that fills mid-run stops the run with the folder and "no space left", and leaves the last good
checkpoint and reports as they were."""

import errno
import json

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from flcore import files
from flcore.config import validate
from flcore.files import OutputWriteError
from flcore.reports import RunReport, read_metrics
from rounds import checkpoint
from strategies.registry import STRATEGIES
from tests.test_reports import eval_row

TORCH_FULL = "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: basic_ios::clear: iostream error"


def state(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((3,), value)})


def save_round(path, server_round: int, cfg) -> None:
    checkpoint.save(path, server_round, state(float(server_round)), FedAvg(), [{"round": server_round}], cfg)


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(TORCH_FULL)],
    ids=["ENOSPC", "torch-iostream"],
)
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one(tmp_path, monkeypatch, failure):
    cfg = validate({"output-dir": str(tmp_path)}, choices={"strategy": STRATEGIES})
    path = tmp_path / checkpoint.CHECKPOINT
    save_round(path, 1, cfg)

    def full_disk(obj, tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 4096})())
    with pytest.raises(OutputWriteError, match=rf"no space left on the device of folder {tmp_path} .*checkpoint\.pt"):
        save_round(path, 2, cfg)
    monkeypatch.undo()
    saved = torch.load(path, weights_only=True)
    assert saved["round"] == 1 and torch.equal(saved["arrays"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CHECKPOINT]  # no temporary file left


def test_a_torch_write_error_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 10 * 2**30})())
    with pytest.raises(RuntimeError, match="basic_ios") as caught:
        files.atomic_write(tmp_path / "model.pt", lambda tmp: (_ for _ in ()).throw(RuntimeError(TORCH_FULL)))
    assert not isinstance(caught.value, OutputWriteError)


def test_a_metrics_line_that_cannot_be_appended_leaves_the_earlier_lines_whole(tmp_path, monkeypatch):
    report = RunReport(tmp_path, 2, ["a", "b"])
    report.record_eval(0, eval_row(0.25))
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)  # the line is in the file when the disk says no
    with pytest.raises(OutputWriteError, match=rf"no space left on the device of folder {tmp_path} .*metrics\.jsonl"):
        report.record_eval(1, eval_row(0.5))
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert [r["round"] for r in read_metrics(tmp_path)] == [0]


def test_a_summary_that_cannot_be_written_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    files.write_json(target, {"accuracy": 0.5})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OutputWriteError, match="no space left"):
        files.write_json(target, {"accuracy": 0.75})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"accuracy": 0.5} and sorted(tmp_path.iterdir()) == [target]

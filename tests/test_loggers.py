"""`log-to`: what TensorBoard and W&B hold, read back from their own files, equals metrics.jsonl, the run config
and the run's figures. W&B runs offline (WANDB_MODE), so nothing leaves the machine."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from wandb.proto import wandb_internal_pb2

import server_app.app as server_app
from flcore.config import ConfigError, log_targets, validate
from flcore.loggers import TENSORBOARD, check_loggers, open_loggers, scalars, wandb_mode
from flcore.reports import RunReport, read_metrics
from strategies.registry import STRATEGIES
from tests.helpers import ClientAppGrid

LOGGERS = ("tensorboard", "wandb")


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B never reaches the network and keeps its own settings and caches out of the home folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def config(tmp_path, **overrides):
    return validate({"output-dir": str(tmp_path), **overrides}, choices={"strategy": STRATEGIES})


# --- readers of what each logger wrote -------------------------------------------------------------------------


def tensorboard_logged(run_dir: Path) -> tuple[dict[int, dict[str, float]], set[str], dict[str, object]]:
    """Scalars by step, image tags, and the hyperparameters, from the event files (TensorBoard's own reader)."""
    events = EventAccumulator(str(run_dir / TENSORBOARD), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            rows.setdefault(event.step, {})[tag] = event.value
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {}
    for key, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        hparams[key] = getattr(value, kind)
    return rows, set(events.Tags()["images"]), hparams


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`): LevelDB's log format of 32 KiB blocks, each
    record a 7-byte header (CRC, length, type FULL/FIRST/MIDDLE/LAST) and a piece of a protobuf `Record`."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # padding to the block's end
            pos += left
            continue
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""


def wandb_logged(run_dir: Path) -> tuple[dict[int, dict[str, object]], dict[str, object], str, str]:
    """History rows by step, the run's config, group and name, from the offline run's `.wandb` file."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows: dict[int, dict[str, object]] = {}
    config, group, name = {}, "", ""
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            group, name = record.run.run_group, record.run.display_name
        elif kind == "history":
            items: dict[str, object] = {}
            for item in record.history.item:  # an image is a dict, sent as one item per field
                path = [item.key] if item.key else list(item.nested_key)
                parent = items
                for part in path[:-1]:
                    parent = parent.setdefault(part, {})
                parent[path[-1]] = json.loads(item.value_json)
            rows.setdefault(int(items.pop("_step")), {}).update(items)
    return rows, config, group, name


def same(logged: float, value: float) -> bool:
    """TensorBoard keeps float32: equal to that precision, NaN equal to NaN."""
    return (math.isnan(value) and math.isnan(logged)) or logged == pytest.approx(value, rel=1e-6, abs=1e-7)


def assert_rows_logged(rows: list[dict], logged: dict[int, dict]) -> None:
    for row in rows:
        expected = scalars(row)
        assert expected, row
        got = logged[row["round"]]
        missing = sorted(set(expected) - set(got))
        assert not missing, missing
        wrong = {k: (got[k], v) for k, v in expected.items() if not same(float(got[k]), v)}
        assert not wrong, wrong


# --- unit: rows fed to the report -------------------------------------------------------------------------------


def eval_row(acc):
    return {
        "accuracy": acc,
        "balanced-accuracy": acc / 2,
        "many-accuracy": acc,
        "medium-accuracy": float("nan"),
        "few-accuracy": 0.0,
        "per-class-accuracy": [acc, 0.125],
        "confusion-matrix": [[3, 1], [2, 0]],
    }


def test_log_to_takes_none_or_loggers_and_names_the_key_otherwise(tmp_path):
    assert log_targets(str(config(tmp_path)["log-to"])) == []
    assert log_targets(str(config(tmp_path, **{"log-to": "wandb, tensorboard,wandb"})["log-to"])) == [
        "wandb",
        "tensorboard",
    ]
    for bad in ("tensorbord", "none,wandb", "", "mlflow"):
        with pytest.raises(ConfigError, match=r"'log-to' .* expected none, or tensorboard and/or wandb"):
            config(tmp_path, **{"log-to": bad})


def test_a_logger_whose_package_is_missing_is_refused_before_start(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def without_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_wandb)
    with pytest.raises(ConfigError, match=r"'log-to' = 'wandb' needs the 'wandb' package.*\[logging\]"):
        check_loggers(config(tmp_path, **{"log-to": "wandb"}))


def test_rows_become_scalars_lists_one_per_entry_matrices_left_out():
    row = {
        "round": 3,
        "accuracy": 0.5,
        "per-class-accuracy": [0.25, float("nan")],
        "confusion-matrix": [[1, 0], [0, 1]],
        "node-data": {"n1": {"num-examples": 7, "class-counts": [3, 4]}},
        "teacher": "holdout",
        "aligned": True,
    }
    out = scalars(row)
    assert math.isnan(out.pop("per-class-accuracy/1"))  # a class without test images: kept as NaN
    assert out == {
        "accuracy": 0.5,
        "per-class-accuracy/0": 0.25,
        "node-data/n1/num-examples": 7.0,
        "node-data/n1/class-counts/0": 3.0,
        "node-data/n1/class-counts/1": 4.0,
        "aligned": 1.0,
    }


def test_wandb_is_offline_unless_logged_in_or_told(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # W&B reads WANDB_MODE itself


@pytest.mark.parametrize("logger", LOGGERS)
def test_each_logger_holds_every_row_the_config_and_the_figures(tmp_path, logger):
    cfg = config(tmp_path, **{"log-to": logger, "log-group": "grid-a", "num-server-rounds": 2, "lr": 0.05})
    report = RunReport.create(cfg, 42, ["a", "b"])
    report.log_to(open_loggers(cfg, report.dir, 42))
    report.write_partition(np.array([[3, 0], [1, 2]]), np.array([4, 2]), {"many": [0], "medium": [], "few": [1]})
    report.record_eval(0, eval_row(0.25))
    for r in (1, 2):
        report.record_train(r, {"train-loss": 1.5 / r, "upload-bytes": 1000.0 * r})
        report.record_eval(r, {**eval_row(0.25 * r), "pre-align-accuracy": 0.2 * r, "align-loss": 0.7})
    report.finish({"w": torch.ones(2)})
    rows = read_metrics(report.dir)
    if logger == "tensorboard":
        logged, images, hparams = tensorboard_logged(report.dir)
        assert {"partition", "curves", "confusion"} <= images
        assert hparams["lr"] == pytest.approx(0.05) and hparams["log-group"] == "grid-a"
    else:
        logged, run_config, group, name = wandb_logged(report.dir)
        assert {"partition", "curves", "confusion"} <= set().union(*logged.values())
        assert logged[2]["curves"]["_type"] == "image-file"
        assert {k: run_config[k] for k in cfg} == cfg and (group, name) == ("grid-a", "42")
    assert_rows_logged(rows, logged)
    assert sorted(logged) == [0, 1, 2]


# --- integration: a tiny run through the ServerApp and the real ClientApp -------------------------------------


@pytest.mark.usefixtures("flower_identity", "one_thread")
def test_a_tiny_run_logs_to_both_what_metrics_jsonl_holds(tmp_path):
    cfg = config(
        tmp_path,
        **{
            "num-clients": 4,
            "fraction-train": 0.5,
            "num-server-rounds": 2,
            "local-epochs": 1,
            "image-size": 8,
            "projection-dim": 32,
            "align": True,
            "align-steps": 1,
            "log-to": "tensorboard,wandb",
        },
    )
    server_app.run(ClientAppGrid(cfg), cfg, "logged")
    run_dir = tmp_path / "logged"
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "train-loss" in rows[1] and "pre-align-accuracy" in rows[2]
    figures = {p.stem for p in run_dir.glob("*.png")}
    assert {"partition", "curves", "confusion", "alignment-step"} <= figures
    tb_rows, tb_images, hparams = tensorboard_logged(run_dir)
    assert_rows_logged(rows, tb_rows)
    assert figures <= tb_images and hparams["num-clients"] == 4
    wb_rows, wb_config, _, name = wandb_logged(run_dir)
    assert_rows_logged(rows, wb_rows)
    assert figures <= set().union(*wb_rows.values()) and wb_config["align"] is True and name == "logged"

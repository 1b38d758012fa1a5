import subprocess
import tomllib
from pathlib import Path

import pytest

from flcore import config_docs
from flcore.config import SCHEMA, ConfigError
from flcore.run_config import parse_overrides
from server_app import launch, watchdog
from tests.helpers import make_run_plan, validated

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_valid_and_complete():
    cfg = validated()
    assert set(cfg) == set(SCHEMA)
    assert cfg["dataset"] == "digits" and cfg["num-clients"] == 20 and cfg["fraction-train"] == 0.4


def test_pyproject_declares_every_key_with_the_schema_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == {k: o.default for k, o in SCHEMA.items()}


def test_configuration_doc_matches_schema():
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert doc == config_docs.markdown(), f"docs/configuration.md is stale; run: {config_docs.REGENERATE}"
    missing = [k for k in SCHEMA if f"| `{k}` |" not in doc]
    assert not missing, f"docs/configuration.md lacks: {missing}"


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        ({"dataset": "mnist"}, "dataset", "digits, cifar10"),
        ({"strategy": "fedfoo"}, "strategy", "fedavg"),
        ({"imbalance-factor": 0.5}, "imbalance-factor", ">= 1"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha", "> 0"),
        ({"dirichlet-alpha": -1}, "dirichlet-alpha", "> 0"),
        ({"fraction-train": 0.0}, "fraction-train", "> 0"),
        ({"fraction-train": 1.5}, "fraction-train", "<= 1"),
        ({"num-clients": 0}, "num-clients", ">= 1"),
        ({"num-server-rounds": 0}, "num-server-rounds", ">= 1"),
        ({"num-clients": 2.5}, "num-clients", "integer"),
        ({"lr": "fast"}, "lr", "wrong type"),
        ({"dataset": "cifar10"}, "data-dir", "needs a local data root"),
        ({"dataset": "folder", "data-dir": "/no/such/dir"}, "data-dir", "not an existing folder"),
        ({"few-threshold": 200}, "few-threshold", "many-threshold"),
        ({"colour": "blue"}, "colour", "unknown run-config key"),
        ({"partitioner": "iid"}, "partitioner", "creff, dirichlet"),
        ({"align-data": "/no/such/dir"}, "align-data", "auto, train, val or an existing folder"),
        ({"align-data": "val"}, "align-data", "only imagenet-lt has a published val split"),
        ({"align": True, "eval-every": 2, "align-eval-every": 3}, "align-eval-every", "multiple of eval-every (2)"),
        ({"align-eval-every": -1}, "align-eval-every", ">= 0"),
    ],
)
def test_invalid_values_name_key_value_and_rule(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        validated(overrides)
    assert f"'{key}'" in str(err.value) or key in str(err.value)
    assert hint in str(err.value)


def test_imagenet_lt_requires_if_one(tmp_path):
    with pytest.raises(ConfigError, match="imbalance-factor.*imagenet-lt"):
        validated({"dataset": "imagenet-lt", "data-dir": str(tmp_path), "imbalance-factor": 10.0})


def test_overrides_parse_toml_values_and_bare_words(tmp_path):
    extra = tmp_path / "more.toml"
    extra.write_text("seed = 3\n")
    got = parse_overrides(["dataset=cifar10 lr=0.1 augment=false", 'strategy="fedavg"', str(extra)])
    assert got == {"dataset": "cifar10", "lr": 0.1, "augment": False, "strategy": "fedavg", "seed": 3}


def test_launcher_rejects_bad_input_before_starting_anything(no_superlink, capsys):
    assert launch.main(["--run-config", "imbalance-factor=0.5"]) == 2
    assert "'imbalance-factor' = 0.5" in capsys.readouterr().err
    assert launch.main(["--run-config", "dataset=cifar100 data-dir=/nonexistent"]) == 2


def test_launcher_reports_missing_dataset_files(no_superlink, capsys, tmp_path):
    assert launch.main(["--run-config", f"dataset=cifar10 data-dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and str(tmp_path) in err


def test_stop_tree_also_ends_descendants_in_other_sessions(tmp_path):
    import time

    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(["bash", "-c", f"setsid sleep 300 & echo $! > {pidfile}; sleep 300"])
    deadline = time.time() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.time() < deadline
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    assert grandchild in watchdog.process_tree(proc.pid)
    launch.stop(proc, grace=5)
    assert proc.poll() is not None
    assert not watchdog.alive(grandchild)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf").glob("*.toml")))
def test_every_preset_of_the_paper_validates(preset, tmp_path):
    """conf/<preset>.toml holds the paper's settings; only the local paths come from the user."""
    values = tomllib.loads((ROOT / "conf" / f"{preset}.toml").read_text())
    assert values["num-clients"] == 20 and values["fraction-train"] == 0.4 and values["num-server-rounds"] == 200
    assert values["local-epochs"] == 10 and values["batch-size"] == 32 and values["lr"] == 0.1
    cfg = validated({**values, "data-dir": str(tmp_path)})
    assert {k: cfg[k] for k in values} == values


def test_make_run_passes_the_preset_before_the_overrides(tmp_path, monkeypatch):
    """`make run PRESET=x RUN_CONFIG=...`: the launcher reads files and pairs in order, later ones winning."""
    dry = make_run_plan(tmp_path, "PRESET=cifar10-lt", "RUN_CONFIG=imbalance-factor=50")
    assert "--run-config conf/cifar10-lt.toml --run-config 'imbalance-factor=50'" in dry
    monkeypatch.chdir(ROOT)
    got = parse_overrides(["conf/cifar10-lt.toml", "imbalance-factor=50"])
    assert got["imbalance-factor"] == 50 and got["dataset"] == "cifar10"

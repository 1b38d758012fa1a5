"""`validate` returns one frozen, typed `Settings` made from the schema, with the derived facts as properties."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from collections.abc import Mapping

import pytest

from flcore.config import SCHEMA, ConfigError, Settings, field_name, validate


def test_every_schema_key_is_a_field_typed_as_its_option() -> None:
    cfg = validate({})
    assert [f.name for f in dataclasses.fields(cfg)] == [field_name(key) for key in SCHEMA]
    for key, option in SCHEMA.items():
        expected = option.kinds or type(option.default)
        assert isinstance(getattr(cfg, field_name(key)), expected), key


def test_values_are_typed_whatever_toml_gave() -> None:
    cfg = validate({"imbalance-factor": 10, "lr": 1, "seed": 3.0, "num-server-rounds": 2})
    assert type(cfg.imbalance_factor) is float and cfg.imbalance_factor == 10.0
    assert type(cfg.lr) is float
    assert type(cfg.seed) is int and cfg.seed == 3
    assert type(cfg.num_server_rounds) is int


def test_frozen() -> None:
    cfg = validate({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg["seed"] = 1  # type: ignore[index]


def test_a_mapping_by_run_config_key() -> None:
    cfg = validate({"seed": 5})
    assert isinstance(cfg, Mapping) and isinstance(cfg, Settings)
    assert cfg["seed"] == cfg.seed == 5 and cfg.get("seed") == 5 and cfg.get("no-such-key") is None
    assert list(cfg) == list(SCHEMA) and len(cfg) == len(SCHEMA)
    assert cfg.to_dict() == dict(cfg) == {**cfg} and type(cfg.to_dict()) is dict
    assert cfg == validate({"seed": 5}) and cfg != validate({"seed": 6})
    assert hash(cfg) == hash(validate({"seed": 5}))
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # Ray and loader workers pickle it


def test_properties_do_not_shadow_fields_or_mapping_methods() -> None:
    names = set(dir(Mapping)) | {"to_dict", "with_", "local_data", "holdout_teacher", "align_source"}
    assert not names & {field_name(key) for key in SCHEMA}


def test_with_changes_checks_and_types_the_values() -> None:
    cfg = validate({})
    changed = cfg.with_(lr=1, proximal_mu=0.0)
    assert type(changed.lr) is float and changed.lr == 1.0 and changed.proximal_mu == 0.0
    assert cfg.lr == 0.1  # the original is untouched
    with pytest.raises(ConfigError, match="'lr' = -1 is not allowed"):
        cfg.with_(lr=-1)
    with pytest.raises(ConfigError, match="unknown Settings field"):
        cfg.with_(learning_rate=0.1)


def test_derived_facts() -> None:
    default = validate({})
    assert not default.local_data and not default.holdout_teacher
    assert validate({"client-data": "local"}, paths=False).local_data
    assert validate({"align-teacher": "holdout"}).holdout_teacher
    assert default.align_source == "train"
    assert validate({"num-clients": 20, "fraction-train": 0.4}).clients_per_round == 8
    assert validate({"num-clients": 3, "fraction-train": 0.1}).clients_per_round == 1
    key = dict(default.data_key)
    assert key["seed"] == 7 and key["holdout-per-class"] == 0  # no reserve without the holdout teacher
    assert dict(validate({"align-teacher": "holdout", "holdout-per-class": 40}).data_key)["holdout-per-class"] == 40


def test_unknown_keys_still_refused_with_the_same_message() -> None:
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\): bogus; known keys: dataset, data-dir"):
        validate({"bogus": 1})


def test_overlay_takes_the_run_config_keys_of_a_round_config() -> None:
    cfg = validate({})
    round_config = {"server-round": 3, "proximal-mu": 0.5, "local-epochs": 2}
    assert cfg.overlay(round_config).proximal_mu == 0.5 and cfg.overlay(round_config).local_epochs == 2
    with pytest.raises(ConfigError, match="'local-epochs' = 0 is not allowed"):
        cfg.overlay({"local-epochs": 0})


def test_name_choices_are_the_registries_keys(monkeypatch) -> None:
    from flcore import datasets, device, losses, models, partitioners

    monkeypatch.setitem(models.BACKBONES, "resnet18", models.resnet8)
    monkeypatch.setitem(losses.LOSSES, "balanced-softmax", losses.LOSSES["ce"])
    monkeypatch.setitem(partitioners.PARTITIONERS, "iid", partitioners.PARTITIONERS["dirichlet"])
    cfg = validate({"model": "resnet18", "holdout-model": "resnet18", "loss": "balanced-softmax", "partitioner": "iid"})
    assert cfg.model == cfg.holdout_model == "resnet18" and cfg.loss == "balanced-softmax" and cfg.partitioner == "iid"
    assert list(SCHEMA["head"].choices) == ["auto", *models.HEADS]
    assert list(SCHEMA["amp"].choices) == ["off", *device.AMP_DTYPES]
    assert list(SCHEMA["dataset"].choices) == list(datasets.LOADERS)
    with pytest.raises(ConfigError, match="'model' = 'vgg' is not allowed: choose one of resnet8, resnet50, resnet18"):
        validate({"model": "vgg"})


def test_validating_a_config_reads_the_partitioner_names_without_importing_datasets() -> None:
    """A node holding its own data validates its config (the partitioner key too) and never imports `datasets`."""
    code = (
        "import sys; from flcore.config import validate; "
        "cfg = validate({'client-data': 'local', 'partitioner': 'dirichlet'}, paths=False); "
        "print(cfg.partitioner, [m for m in ('datasets', 'flwr_datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["dirichlet", "[]"]


def test_a_round_config_sets_only_the_training_keys() -> None:
    from flcore.training import TrainSettings

    cfg = validate({"proximal-mu": 0.3})
    plain = TrainSettings.for_round(cfg, {"lr": 0.5, "loss": "ratio", "kd-temperature": 0.0})
    assert plain.lr == 0.5 and plain.proximal_mu == 0.0  # the proximal term only when the round sends it
    assert TrainSettings.for_round(cfg, {"proximal-mu": 0.3}).proximal_mu == 0.3

"""CLIP2FL against its authors' code: the client's KD term, the server's text contrast and the defaults.

The expected numbers come from CLIP2FL's own `KDLoss` (main.py) and `SupConLoss_text` (losses.py) run on the
fixture's inputs (`tests/fixtures/parity/clip2fl.json`: its `source` and `recipe` say which files, which
commit and how), in float64.
"""

import json
from pathlib import Path

import pytest
import torch

from client_app import distill
from strategies.clip2fl import TextContrast, text_contrast_loss
from tests.helpers import validated

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "clip2fl.json").read_text())


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("temperature", ["3.0", "1.0"])
def test_client_kd_term_matches_clip2fls_kd_loss(monkeypatch, temperature):
    """The term the client adds to its loss (`client_app.distill.distillation`), value and gradient."""
    kd = FIXTURE["kd"]
    teacher = f64(kd["teacher"])
    monkeypatch.setattr(distill, "teacher_logits", lambda cfg, pid, classes, images: teacher)
    cfg = validated({"strategy": "clip2fl"})
    server_config = {"kd-weight": 1.0, "kd-temperature": float(temperature)}
    classes = tuple(range(teacher.shape[1]))
    term = distill.distillation(cfg, server_config, 0, classes, range(len(teacher)))
    student = f64(kd["student"]).requires_grad_(True)
    loss = term(student, torch.arange(len(teacher)))
    loss.backward()
    expected = kd["by_temperature"][temperature]
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-9)
    assert torch.allclose(student.grad, f64(expected["grad_student"]), atol=1e-9)


@pytest.mark.parametrize("case", range(len(FIXTURE["contrast"])))
def test_server_text_contrast_matches_clip2fls_supconloss_text(case):
    data = FIXTURE["contrast"][case]
    features = f64(data["features"]).requires_grad_(True)
    loss = text_contrast_loss(features, torch.tensor(data["labels"]), f64(data["text"]), data["temperature"])
    loss.backward()
    assert loss.item() == pytest.approx(data["loss"], rel=1e-9)
    assert torch.allclose(features.grad, f64(data["grad_features"]), atol=1e-9)


def test_defaults_are_clip2fls_and_the_server_term_is_weighted_by_contrast_weight():
    cfg = validated({"strategy": "clip2fl"})
    defaults = FIXTURE["defaults"]
    for key in ("kd-weight", "kd-temperature", "contrast-weight", "contrast-temperature", "clip2fl-prompt"):
        assert cfg[key] == defaults[key], key
    data = FIXTURE["contrast"][0]  # main.py's layout, at CLIP2FL's ins_temp 0.1
    assert data["temperature"] == cfg["contrast-temperature"]
    term = TextContrast(lambda: f64(data["text"]), cfg["contrast-weight"], cfg["contrast-temperature"])
    got = term(f64(data["features"]), torch.tensor(data["labels"]))
    assert got.item() == pytest.approx(defaults["contrast-weight"] * data["loss"], rel=1e-9)

"""Parity with CReFF's own code (github:shangxinyi/CReFF-FL): the fixture holds what their functions return on
small fixed inputs (its `source` and `recipe` fields say which file, commit and inputs); the project's functions
must return the same.

- the client split: `Dataset/sample_dirichlet.py`'s `clients_indices` against `flcore.creff_split.creff_split`;
- one and five feature-matching steps (`Global.update_feature_syn` with `match_loss`) against
  `FederatedFeatures.match`, and their starting distance against `match_distance`;
- one and three classifier re-training epochs (`Global.feature_re_train`) against `retrain_classifier`;
- each DSA transform of `Dataset/param_aug.py` with the parameters their seeded draw gives against `flcore.dsa`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flcore.class_statistics import classifier_grad
from flcore.creff_split import creff_split
from flcore.dsa import TRANSFORMS
from strategies.class_uploads import retrain_classifier
from strategies.creff import FederatedFeatures, match_distance

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "creff.json").read_text())


def test_the_creff_split_gives_the_authors_index_lists():
    case = FIXTURE["split"]
    labels = np.asarray(case["labels"])
    parts = creff_split(labels, case["num_clients"], case["alpha"], case["seed"], case["num_classes"])
    assert [p.tolist() for p in parts] == case["clients"]  # the same images, in the same order, per client


def _matching_inputs() -> tuple[dict, torch.Tensor, torch.Tensor, list[dict]]:
    case = FIXTURE["matching"]
    classes, dim = case["num_classes"], case["dim"]
    uploads = []
    for held in case["client_grads"]:
        upload = {
            "counts": np.zeros(classes),
            "grad-weight": np.zeros((classes, classes, dim), np.float32),
            "grad-bias": np.zeros((classes, classes), np.float32),
        }
        for c, grads in held.items():
            upload["counts"][int(c)] = 1
            upload["grad-weight"][int(c)], upload["grad-bias"][int(c)] = grads["grad-weight"], grads["grad-bias"]
        uploads.append(upload)
    weight, bias = (torch.tensor(case[k], dtype=torch.float64) for k in ("weight", "bias"))
    return case, weight, bias, uploads


def test_the_gradient_distance_is_the_authors():
    case, weight, bias, uploads = _matching_inputs()
    per_class = case["per_class"]
    feats = torch.tensor(case["features0"], dtype=torch.float64)
    total = 0.0
    for c in range(case["num_classes"]):
        holders = [u for u in uploads if u["counts"][c]]
        real = [torch.tensor(sum(u[k][c] for u in holders) / len(holders)) for k in ("grad-weight", "grad-bias")]
        syn = classifier_grad(feats[c * per_class : (c + 1) * per_class], c, weight, bias, create_graph=False)
        total += float(match_distance(syn, tuple(real)))
    assert total == pytest.approx(case["match"]["1"]["distance-before"], rel=1e-6)


@pytest.mark.parametrize("epochs", ["1", "5"])
def test_feature_matching_moves_the_features_as_the_authors(epochs):
    case, weight, bias, uploads = _matching_inputs()
    features = FederatedFeatures(torch.tensor(case["features0"], dtype=torch.float64), case["per_class"])
    last = features.match(weight, bias, uploads, int(epochs), case["lr_feature"])
    expected = np.asarray(case["match"][epochs]["features"])
    np.testing.assert_allclose(features.features.numpy(), expected, rtol=0, atol=2e-6)
    if epochs == "1":
        assert last == pytest.approx(case["match"]["1"]["distance-before"], rel=1e-6)


@pytest.mark.parametrize("epochs", ["1", "3"])
def test_classifier_retraining_steps_as_the_authors(epochs):
    case = FIXTURE["matching"]
    run = case["retrain"][epochs]
    feats = torch.tensor(case["match"]["5"]["features"])
    labels = torch.arange(case["num_classes"]).repeat_interleave(case["per_class"])
    start = torch.tensor(run["start-weight"]), torch.tensor(run["start-bias"])
    weight, bias = retrain_classifier(
        *start, feats, labels, int(epochs), case["lr_net"], torch.Generator().manual_seed(0), batch_size=32
    )
    np.testing.assert_allclose(weight.numpy(), np.asarray(run["weight"]), rtol=0, atol=1e-7)
    np.testing.assert_allclose(bias.numpy(), np.asarray(run["bias"]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_each_dsa_transform_is_the_authors(name):
    case = FIXTURE["dsa"]
    x = torch.tensor(case["input"])
    expected = case["transforms"][name]
    apply, _ = TRANSFORMS[name]
    got = apply(x, *expected["params"])
    np.testing.assert_allclose(got.numpy(), np.asarray(expected["output"]), rtol=0, atol=1e-5)
    assert not torch.allclose(got, x)  # the drawn parameters change the image

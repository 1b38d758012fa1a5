"""FedETF's ETF, classifier, balanced softmax and one client step against its authors' code
(ZexiLee/ICCV-2023-FedETF: `Proto_Classifier`, their ResNet's classifier tail, `client_fedetf`), run outside the
project on the fixture's inputs; the fixture names the files and commit."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flcore.losses import balanced_log_prior, balanced_softmax_loss
from flcore.models import ETFClassifier, orthonormal_basis, simplex_etf

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "fedetf.json").read_text())


def tensor(key: str) -> torch.Tensor:
    return torch.tensor(FIXTURE[key], dtype=torch.float32)


def authors_classifier() -> ETFClassifier:
    """The project's ETF classifier holding the fixture's projection and the ETF built from its draw `a`."""
    classes, width = np.array(FIXTURE["weight0"]).shape
    head = ETFClassifier(width, classes)
    with torch.no_grad():
        head.projection.weight.copy_(tensor("weight0"))
        head.projection.bias.copy_(tensor("bias0"))
        head.etf.copy_(simplex_etf(orthonormal_basis(torch.tensor(FIXTURE["a"], dtype=torch.float64))))
    return head


def test_the_simplex_etf_matches_the_authors_proto_classifier():
    etf = simplex_etf(orthonormal_basis(torch.tensor(FIXTURE["a"], dtype=torch.float64)))
    np.testing.assert_allclose(etf.numpy(), np.array(FIXTURE["etf"]), atol=1e-6)
    classes = etf.shape[1]
    gram = (etf.T @ etf).numpy()
    np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-6)  # unit columns, pairwise cosine -1/(C-1)
    np.testing.assert_allclose(gram[~np.eye(classes, dtype=bool)], -1 / (classes - 1), atol=1e-6)


def test_the_balanced_prior_counts_an_absent_class_as_one_image():
    counts = np.bincount(FIXTURE["labels"], minlength=len(FIXTURE["sample_per_class"]))
    np.testing.assert_allclose(balanced_log_prior(counts).exp().numpy(), FIXTURE["sample_per_class"])


@pytest.mark.parametrize(("opt", "balanced"), [("balancedloss", True), ("celoss", False)])
def test_one_client_step_matches_the_authors_client_fedetf(opt, balanced):
    expected = FIXTURE["steps"][opt]
    head = authors_classifier()
    features, labels = tensor("features"), torch.tensor(FIXTURE["labels"])
    counts = np.bincount(FIXTURE["labels"], minlength=len(FIXTURE["sample_per_class"]))
    prior = balanced_log_prior(counts)
    opt_ = torch.optim.SGD(
        head.parameters(), lr=FIXTURE["lr"], momentum=FIXTURE["momentum"], weight_decay=FIXTURE["weight_decay"]
    )
    logits = head(features)
    np.testing.assert_allclose(logits.detach().numpy(), np.array(expected["logits"]), atol=1e-6)
    loss = balanced_softmax_loss(logits, labels, prior) if balanced else F.cross_entropy(logits, labels)
    assert float(loss.detach()) == pytest.approx(expected["loss"], rel=1e-6)
    loss.backward()
    opt_.step()
    np.testing.assert_allclose(head.projection.weight.detach().numpy(), np.array(expected["weight"]), atol=1e-6)
    np.testing.assert_allclose(head.projection.bias.detach().numpy(), np.array(expected["bias"]), atol=1e-6)
    assert float(head.scale.detach()) == pytest.approx(expected["scale"], abs=1e-6)

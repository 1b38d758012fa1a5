"""FedLoGe's SSE-C, client step, local head and both realignments against its authors' code
(ZackZikaiXiao/FedLoGe: `ETF_Classifier.gen_sparse_ETF`, `LocalUpdate.update_weights_gaux`,
`update_weights_norm_init`, `globaltest_calibra`, `localtest`), run outside the project on the fixture's inputs;
the fixture names the files and commit."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flcore.fedloge import FedLoGeClassifier, client_objective, local_realign, realign_global, sparsify_etf
from flcore.models import orthonormal_basis, simplex_etf
from flcore.personalize import fit_local_head
from flcore.training import TrainSettings, train

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "fedloge.json").read_text())
D, C = np.array(FIXTURE["dense"]).shape


def tensor(key: str, source: dict = FIXTURE) -> torch.Tensor:
    return torch.tensor(source[key], dtype=torch.float32)


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


class Tiny(nn.Module):
    """The fixture's backbone relu(fc(x)) with FedLoGe's classifier: the `embed` and `classifier` a model has."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = linear(tensor("fc_w"), tensor("fc_b"))
        self.classifier = FedLoGeClassifier(D, C)
        with torch.no_grad():
            self.classifier.g_aux.weight.copy_(tensor("aux_w"))
            self.classifier.g_aux.bias.copy_(tensor("aux_b"))
            self.classifier.sse.copy_(tensor("sparse").t())
            self.classifier.sse_bias.copy_(tensor("sse_b"))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class OneBatch:
    """The fixture's whole client set as one batch (their DataLoader's shuffle does not change a full-batch step)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return 1

    def iterate(self, shuffle: bool = False, augment: bool = False, gen: torch.Generator | None = None):
        yield self.x, self.y


def test_the_dense_etf_is_the_authors_ori_m():
    dense = simplex_etf(orthonormal_basis(torch.tensor(FIXTURE["a"], dtype=torch.float64)))
    np.testing.assert_allclose(dense.numpy(), np.array(FIXTURE["dense"]), atol=1e-6)


def test_the_sparse_etf_matches_the_authors_gen_sparse_etf():
    zeros = torch.zeros(D * C, dtype=torch.bool)
    zeros[FIXTURE["zero_indices"]] = True
    sparse = sparsify_etf(tensor("dense"), zeros.view(D, C), FIXTURE["steps"])
    expected = np.array(FIXTURE["sparse"])
    assert ((sparse == 0).numpy() == (expected == 0)).all()  # the zeroed entries stay zero, no other is
    np.testing.assert_allclose(sparse.numpy(), expected, atol=2e-5)


def test_two_client_steps_match_the_authors_update_weights_gaux():
    model = Tiny()
    x, y = tensor("x"), torch.tensor(FIXTURE["y"])
    step, loss = client_objective(model, torch.nn.functional.cross_entropy)
    first = loss(step(x), y).detach()
    np.testing.assert_allclose(float(first), FIXTURE["loss_sse"] + FIXTURE["loss_aux"], rtol=1e-5)
    settings = TrainSettings(2, FIXTURE["lr"], FIXTURE["momentum"], 0.0, augment=False)
    train(step, OneBatch(x, y), settings, torch.Generator().manual_seed(0), loss)
    after = FIXTURE["after"]
    np.testing.assert_allclose(model.fc.weight.detach().numpy(), np.array(after["fc_w"]), atol=1e-6)
    np.testing.assert_allclose(model.fc.bias.detach().numpy(), np.array(after["fc_b"]), atol=1e-6)
    head = model.classifier
    np.testing.assert_allclose(head.g_aux.weight.detach().numpy(), np.array(after["aux_w"]), atol=1e-6)
    np.testing.assert_allclose(head.g_aux.bias.detach().numpy(), np.array(after["aux_b"]), atol=1e-6)
    np.testing.assert_allclose(head.sse.t().numpy(), np.array(FIXTURE["sparse"]), atol=0)  # SSE-C never moves


def test_the_local_head_on_a_still_backbone_matches_the_authors():
    model = Tiny()
    settings = TrainSettings(2, FIXTURE["lr"], FIXTURE["momentum"], 0.0, augment=False)
    batch = OneBatch(tensor("x"), torch.tensor(FIXTURE["y"]))
    l_head = fit_local_head(model, linear(tensor("l_w"), tensor("l_b")), batch, settings, torch.Generator())
    expected = FIXTURE["l_head_fixed"]
    np.testing.assert_allclose(l_head.weight.detach().numpy(), np.array(expected["w"]), atol=1e-6)
    np.testing.assert_allclose(l_head.bias.detach().numpy(), np.array(expected["b"]), atol=1e-6)


def test_the_global_realignment_matches_the_authors_globaltest_calibra():
    realigned = realign_global(tensor("aux_w"))
    np.testing.assert_allclose(realigned.numpy(), np.array(FIXTURE["realigned_w"]), atol=1e-6)
    model = Tiny().eval()
    with torch.no_grad():
        preds = model(tensor("x_test")).argmax(1).numpy()
    assert (preds == np.array(FIXTURE["y_test"])).mean() == pytest.approx(FIXTURE["global_acc"])


def test_the_personalised_head_matches_the_authors_local_realignment_and_localtest():
    scaled = local_realign(tensor("aux_w"), tensor("l_w"))
    np.testing.assert_allclose(scaled.numpy(), np.array(FIXTURE["local_scaled_w"]), atol=1e-6)
    model = Tiny().eval()
    counts = np.bincount(FIXTURE["y"], minlength=C)
    model.classifier.personalize(linear(tensor("l_w"), tensor("l_b")), counts)
    held = FIXTURE["local_held"]
    with torch.no_grad():
        logits = model(tensor("x_test")[held]).numpy()
    expected = np.array(FIXTURE["local_logits"])
    present = counts > 0
    np.testing.assert_allclose(logits[:, present], expected[:, present], atol=1e-5)
    assert (logits[:, ~present] < -1e30).all() and (expected[:, ~present] < -1e6).all()  # both mask the absent class
    labels = np.array(FIXTURE["y_test"])[held]
    assert (logits.argmax(1) == labels).mean() == pytest.approx(FIXTURE["local_acc"])

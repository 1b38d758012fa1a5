"""FedRS against its authors' code (lxcnju/FedRepo, `algorithms/fedrs.py`, `FedRS.update_local`), run outside
the project for one step on the fixture's features, classifier, labels and class counts; the fixture names the
file and commit. The project's loss with `fedrs-variant=authors` and one step of its training loop with the
gradient clipping that variant brings must give the same loss and the same classifier."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flcore.losses import fedrs_loss, fedrs_scale
from flcore.training import TrainSettings, train

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "fedrs.json").read_text())


class Head(nn.Module):
    """A model whose features are its input: the classifier sees the fixture's features as FedRepo's did."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(len(FIXTURE["weight"][0]), len(FIXTURE["weight"]))
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor(FIXTURE["weight"]))
            self.classifier.bias.copy_(torch.tensor(FIXTURE["bias"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class OneBatch:
    """The fixture's batch, as `Batches.iterate` yields it."""

    def iterate(self, **_):
        yield torch.tensor(FIXTURE["x"], dtype=torch.float32), torch.tensor(FIXTURE["labels"])


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"alpha{c['alpha']}-clip{c['max_grad_norm']}")
def test_fedrs_authors_loss_and_clipped_step_match_fedrepo(case):
    torch.manual_seed(0)
    head = Head()
    scale = fedrs_scale(np.array(FIXTURE["counts"]), case["alpha"], "authors")
    loss_fn = lambda logits, labels: fedrs_loss(logits, labels, scale, head.classifier.bias)  # noqa: E731
    x, y = next(OneBatch().iterate())
    with torch.no_grad():
        assert float(loss_fn(head(x), y)) == pytest.approx(case["loss"], rel=1e-6)
    settings = TrainSettings(1, FIXTURE["lr"], FIXTURE["momentum"], 0.0, False, max_grad_norm=case["max_grad_norm"])
    metrics = train(head, OneBatch(), settings, torch.Generator(), loss_fn)
    assert metrics["train-loss"] == pytest.approx(case["loss"], rel=1e-6)
    assert np.allclose(head.classifier.weight.detach().numpy(), case["weight_after"], atol=1e-6)
    assert np.allclose(head.classifier.bias.detach().numpy(), case["bias_after"], atol=1e-7)  # untouched


def test_the_clipping_case_clips():
    """The fixture's small max_grad_norm case is only a test of the clipping if the gradient exceeds it."""
    head, case = Head(), FIXTURE["cases"][1]
    scale = fedrs_scale(np.array(FIXTURE["counts"]), case["alpha"], "authors")
    x, y = next(OneBatch().iterate())
    fedrs_loss(head(x), y, scale, head.classifier.bias).backward()
    assert head.classifier.weight.grad.norm() > case["max_grad_norm"]

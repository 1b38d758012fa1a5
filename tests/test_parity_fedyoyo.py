"""FedYoYo's client effective numbers, the server's EMA prior, the client loss over consecutive steps and Cutout's
hole against its authors' code (shanss132/FedYoYo: `Local.get_feature_mean`, `Local.calculate_eff_weight`,
`Local.local_train`, `FedYoYo()`'s update with `apply_change_threshold`, `Global.cal_prior`, `Cutout`), run outside the
project on the fixture's inputs; the fixture names the files and commit and says how it was made."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flcore.yoyo import YoYoLoss, class_means, cutout_mask, distillation_weight, effective_numbers_of
from strategies.fedyoyo import class_prior, round_effective, update_effective

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "fedyoyo.json").read_text())


def client_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixture's features and labels in its loader's order, cut into its batches."""
    client = FIXTURE["client"]
    feats, labels = torch.tensor(client["features"]), torch.tensor(client["labels"])
    order, size = torch.tensor(client["order"]), client["batch_size"]
    return [(feats[order[s : s + size]], labels[order[s : s + size]]) for s in range(0, len(order), size)]


def test_class_means_and_effective_numbers_match_the_authors_client():
    batches = client_batches()
    classes = len(FIXTURE["client"]["effective"])
    feats, labels = torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])
    np.testing.assert_allclose(class_means(feats, labels, classes).numpy(), FIXTURE["client"]["class_means"], atol=1e-6)
    np.testing.assert_allclose(
        effective_numbers_of(batches, classes).numpy(), FIXTURE["client"]["effective"], rtol=1e-5
    )


def test_the_server_ema_and_prior_match_the_authors_round_loop():
    effective = None
    for expected in FIXTURE["server"]:
        uploads = [np.array(u) for u in expected["uploads"]]
        effective = update_effective(effective, round_effective(uploads, len(expected["effective"])))
        np.testing.assert_allclose(effective, expected["effective"], rtol=1e-6)
        np.testing.assert_allclose(class_prior(effective), expected["prior"], rtol=1e-6)


@pytest.mark.parametrize("case", FIXTURE["loss"], ids=[c["name"] for c in FIXTURE["loss"]])
def test_consecutive_client_steps_match_the_authors_local_train(case):
    counts = torch.tensor(case["counts"], dtype=torch.float32)
    weight = distillation_weight(case["round"], case["lamda"], case["warmup"])
    loss_fn = YoYoLoss(
        torch.tensor(case["prior"]), counts / counts.sum(), case["gamma"], case["tau"], case["T"], weight
    )
    for logits, labels, expected in zip(case["logits"], case["labels"], case["steps"], strict=True):
        logits = torch.tensor(logits, requires_grad=True)
        loss = loss_fn(logits, torch.tensor(labels * 2))  # the weak view's labels, then the strong view's
        loss.backward()
        assert float(loss.detach()) == pytest.approx(expected["loss"], rel=1e-5)
        np.testing.assert_allclose(logits.grad.numpy(), expected["grad"], atol=1e-6)


@pytest.mark.parametrize("case", FIXTURE["cutout"], ids=[f"seed{c['seed']}" for c in FIXTURE["cutout"]])
def test_the_cutout_hole_matches_the_authors_cutout(case):
    mask = cutout_mask(
        case["height"], case["width"], torch.tensor([case["y"]]), torch.tensor([case["x"]]), case["length"]
    )
    np.testing.assert_array_equal(mask[0].int().numpy(), case["mask"])

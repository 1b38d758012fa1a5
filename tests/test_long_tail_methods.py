"""FedDF, FedBE, Ratio Loss, FedLC and FedRS: each core computation against a hand-computed case, the
client and server halves in-process, and all five through the real ServerApp and ClientApp.

Models are tiny random-weight ResNet-8 configurations on the offline digits data.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from PIL import Image
from torch import nn

from bench import compare
from client_app import app as client
from flcore.class_statistics import npy_bytes
from flcore.config import ConfigError
from flcore.losses import (
    FEDRS_MAX_GRAD_NORM,
    LOSS_KEY,
    RATIO_WEIGHTS_KEY,
    LossInputs,
    build_loss,
    kd_loss,
    max_grad_norm,
    ratio_loss,
)
from flcore.models import build_model, run_model
from flcore.reports import read_metrics
from flcore.run_data import prepare
from flcore.server_data import server_data
from flcore.training import TrainSettings
from server_app import app as server_app
from server_app.preflight import preflight
from strategies import ensemble_distillation
from strategies import feddf as feddf_method
from strategies import ratio_loss as ratio_method
from strategies.ensemble_distillation import ClientModels, RoundModels, batches_of, logits_of, unlabeled_images
from strategies.fedavg import fedavg
from strategies.fedbe import layer_gaussian, pseudo_labels
from strategies.feddf import Schedule, distill_with_early_stopping, ensemble_targets
from strategies.registry import client_workload
from tests.helpers import ONE_CLIENT, ClientAppGrid, client_train, validated

pytestmark = pytest.mark.usefixtures("flower_identity", "one_thread")


def cfg_of(**overrides):
    return validated(ONE_CLIENT, **overrides)


# FedLC and FedRS: the client's own label counts change its softmax


def test_fedlc_calibrated_logits_match_the_hand_computed_case():
    loss = build_loss(LossInputs(cfg_of(loss="fedlc", **{"fedlc-tau": 2.0}), np.array([16, 1, 0])))
    logits, label = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0])
    # tau * n^(-1/4) = 2 * [16^-0.25, 1, (1e-8)^-0.25] = [1, 2, 200] -> calibrated logits [2, -1, -200]
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(-200)))
    assert float(loss(logits, label)) == pytest.approx(expected, rel=1e-6)
    no_calibration = build_loss(LossInputs(cfg_of(loss="fedlc", **{"fedlc-tau": 0.0}), np.array([16, 1, 0])))
    assert float(no_calibration(logits, label)) == pytest.approx(float(F.cross_entropy(logits, label)))


def fedrs_cfg(alpha: float, variant: str):
    return cfg_of(loss="fedrs", **{"fedrs-alpha": alpha, "fedrs-variant": variant})


def test_fedrs_paper_form_scales_only_the_missing_classes():
    counts = np.array([5, 0, 3])
    loss = build_loss(LossInputs(fedrs_cfg(0.5, "paper"), counts))
    logits, label = torch.tensor([[2.0, 4.0, 0.0]]), torch.tensor([0])
    # class 1 is missing: its logit 4 becomes 2, the others stay -> p_0 = e^2 / (e^2 + e^2 + e^0)
    expected = -math.log(math.exp(2) / (2 * math.exp(2) + 1))
    assert float(loss(logits, label)) == pytest.approx(expected, rel=1e-6)
    unrestricted = build_loss(LossInputs(fedrs_cfg(1.0, "paper"), counts))
    assert float(unrestricted(logits, label)) == pytest.approx(float(F.cross_entropy(logits, label)))


def test_fedrs_authors_form_scales_by_the_count_share_and_leaves_the_bias_out():
    counts, bias = np.array([5, 0, 3]), torch.tensor([1.0, -1.0, 0.5])
    loss = build_loss(LossInputs(fedrs_cfg(0.5, "authors"), counts, classifier_bias=bias))
    logits, label = torch.tensor([[3.0, 3.0, 0.5]]), torch.tensor([0])
    # w.h = logits - bias = [2, 4, 0]; scale 0.5 + 0.5 * n / 5 = [1, 0.5, 0.8] -> [2, 2, 0]
    expected = -math.log(math.exp(2) / (2 * math.exp(2) + 1))
    assert float(loss(logits, label)) == pytest.approx(expected, rel=1e-6)
    # alpha 1: every scale is 1, so it is the CE of the logits without their bias, not plain CE
    bias_free = build_loss(LossInputs(fedrs_cfg(1.0, "authors"), counts, classifier_bias=bias))
    assert float(bias_free(logits, label)) == pytest.approx(float(F.cross_entropy(logits - bias, label)))


def test_only_the_authors_fedrs_clips_the_clients_gradient(monkeypatch):
    assert max_grad_norm(fedrs_cfg(0.5, "authors"), {}) == FEDRS_MAX_GRAD_NORM == 100.0
    assert max_grad_norm(fedrs_cfg(0.5, "paper"), {}) == 0.0
    assert max_grad_norm(cfg_of(), {}) == 0.0
    clipped = []  # what the ClientApp's round trains with, the training itself left out
    monkeypatch.setattr(
        client, "train", lambda model, batches, settings, *rest: clipped.append(settings.max_grad_norm) or {}
    )
    for cfg in (fedrs_cfg(0.5, "authors"), cfg_of()):
        client_train(cfg)
    assert clipped == [100.0, 0.0]


# Ratio Loss: class weights and the monitor from the per-class updates on the auxiliary set


class LinearHead(nn.Module):
    """A model whose classifier input is the image itself: the classifier's updates are exact by hand."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.zero_()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class FeatureBatches:
    """One batch of given features and labels, as `Batches.iterate` yields them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def iterate(self, **_):
        yield self.x, self.y


def one_step(lr: float) -> TrainSettings:
    return TrainSettings(1, lr, 0.0, 0.0, augment=False)


def test_ratio_weights_match_the_hand_computed_case():
    # Two classes, one auxiliary image each with feature 1; logits [ln 3, 0] -> softmax [0.75, 0.25]. One SGD
    # step (lr 1) on class 0's image moves the weights by [0.25, -0.25], on class 1's by [-0.75, 0.75].
    head = LinearHead(torch.tensor([[math.log(3.0)], [0.0]]))
    per_class = [FeatureBatches(torch.ones(1, 1), torch.tensor([q])) for q in (0, 1)]
    updates = ratio_method.class_updates(head, per_class, one_step(1.0), torch.Generator())
    assert np.allclose(updates, [[[0.25], [-0.25]], [[-0.75], [0.75]]])
    assert torch.allclose(head.classifier.weight, torch.tensor([[math.log(3.0)], [0.0]]))  # left as it came
    # weight 0: class 0's 0.25 is the largest but class 1's -0.75 exceeds 80 % of it: no owner.
    # weight 1: class 1's 0.75 against 0.25: class 1 owns it, Ra_1 = 0.75 / 0.25. Class 0 owns nothing: Ra_0 = 10.
    assert ratio_method.owners(updates).tolist() == [[-1], [1]]
    assert np.allclose(ratio_method.ratio_estimates(updates), [10.0, 3.0])
    assert np.allclose(ratio_method.class_weights(updates, 1.0, 0.1), [2.0, 1.3])


def test_ratio_monitor_recovers_the_composition_of_a_constructed_imbalance():
    """One full-batch SGD step on n_q copies of each class's auxiliary image moves the classifier by
    lr * sum_q (n_q / N) U_q / lr_aux, with U_q one step on class q's image alone, so the monitor must
    return n / N."""
    gen = torch.Generator().manual_seed(0)
    aux_x, aux_y = torch.randn(4, 6, generator=gen), torch.arange(4)
    head = LinearHead(torch.randn(4, 6, generator=gen) * 0.5)
    per_class = [FeatureBatches(aux_x[q : q + 1], aux_y[q : q + 1]) for q in range(4)]
    updates = ratio_method.class_updates(head, per_class, one_step(0.1), gen)
    counts = np.array([50, 25, 15, 10])
    train_x, train_y = (
        aux_x.repeat_interleave(torch.from_numpy(counts), 0),
        aux_y.repeat_interleave(torch.from_numpy(counts)),
    )
    before = head.classifier.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.3)
    F.cross_entropy(head(train_x), train_y).backward()
    opt.step()
    change = (head.classifier.weight.detach() - before).numpy()
    assert np.allclose(ratio_method.composition(updates, change), counts / counts.sum(), atol=1e-4)


def test_ratio_loss_weights_each_example_by_its_class_and_the_client_checks_the_weights():
    logits, labels = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    weights = np.array([2.0, 0.5], np.float32)
    per_example = F.cross_entropy(logits, labels, reduction="none")
    expected = float((torch.tensor([2.0, 0.5, 0.5]) * per_example).mean())
    assert float(ratio_loss(logits, labels, torch.from_numpy(weights))) == pytest.approx(expected)
    server = {LOSS_KEY: "ratio", RATIO_WEIGHTS_KEY: npy_bytes(weights)}
    assert float(build_loss(LossInputs(cfg_of(), np.ones(2), server))(logits, labels)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="2 non-negative class weights"):
        build_loss(LossInputs(cfg_of(), np.ones(2), {**server, RATIO_WEIGHTS_KEY: npy_bytes(np.ones(3))}))
    with pytest.raises(ValueError, match="sent no 'ratio-weights'"):
        build_loss(LossInputs(cfg_of(), np.ones(2), {LOSS_KEY: "ratio"}))
    with pytest.raises(ValueError, match="this client knows"):
        build_loss(LossInputs(cfg_of(), np.ones(2), {LOSS_KEY: "mystery"}))


def trained(run_config: dict, server_config: dict) -> dict:
    """The weights a client's round on partition 0 ends with, at lr 0.1 without momentum."""
    reply = client_train(cfg_of(**run_config), {"lr": 0.1, "momentum": 0.0, **server_config})
    return reply.content["arrays"].to_torch_state_dict()


def test_client_losses_reduce_to_cross_entropy_at_their_neutral_settings_and_change_training_otherwise():
    ce = trained({}, {})
    same = [
        trained({"loss": "fedlc", "fedlc-tau": 0.0}, {}),
        trained({"loss": "fedrs", "fedrs-alpha": 1.0, "fedrs-variant": "paper"}, {}),
        trained({}, {LOSS_KEY: "ratio", RATIO_WEIGHTS_KEY: npy_bytes(np.ones(10, np.float32))}),
    ]
    for state in same:
        assert all(torch.allclose(ce[k], state[k], atol=1e-6) for k in ce)
    fedlc = trained({"loss": "fedlc"}, {})
    assert not torch.allclose(ce["classifier.bias"], fedlc["classifier.bias"])
    start = run_model(cfg_of(loss="fedrs"), 10, seed=0).state_dict()["classifier.bias"]
    fedrs = trained({"loss": "fedrs"}, {})  # the authors' form: the bias is not in the loss
    assert torch.allclose(fedrs["classifier.bias"], start, atol=1e-7)
    assert not torch.allclose(ce["classifier.bias"], start, atol=1e-4)


# FedBE: the Gaussian over the client weights and the ensemble's pseudo-labels


def test_fedbe_gaussian_is_over_the_normalised_client_updates():
    start = np.array([1.0, 1.0])
    clients = [np.array([4.0, 5.0]), np.array([1.0, 3.0])]  # updates [3, 4] (norm 5) and [0, 2] (norm 2)
    mean, std = layer_gaussian(start, clients, var_scale=0.1)
    # unit updates [.6, .8] and [0, 1]: mu = [.3, .9], var = [.09, .01]; mean norm 3.5
    assert np.allclose(mean, start + 3.5 * np.array([0.3, 0.9])) and np.allclose(std, 3.5 * 0.1 * np.array([0.3, 0.1]))
    same = layer_gaussian(start, [start + 1, start + 2], var_scale=0.1)  # equal directions: the variance floor
    assert np.allclose(same[1], 1.5 * math.sqrt(2) * 0.1 * math.sqrt(1e-5))  # mean norm 1.5 sqrt(2)
    unchanged = layer_gaussian(start, [start, start], var_scale=0.1)  # no update: no division by zero
    assert np.allclose(unchanged[0], start) and np.allclose(unchanged[1], 0.0)


def test_fedbe_pseudo_labels_average_the_members_probabilities():
    members = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]  # probabilities .5/.5 and .75/.25
    assert torch.allclose(pseudo_labels(members).exp(), torch.tensor([[0.625, 0.375]]))


# FedDF: the averaged logits as teacher, and the student moving towards them


def test_feddf_student_moves_towards_the_ensembles_averaged_soft_labels():
    averaged = ensemble_targets([torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 2.0]])])
    assert torch.allclose(averaged.exp(), torch.softmax(torch.tensor([[2.0, 1.0]]), 1))  # mean logits [2, 1]
    cfg = cfg_of(**{"distill-batch-size": 32})
    images = server_data(cfg).align
    train, val = batches_of(cfg, images.subset(np.arange(80))), batches_of(cfg, images.subset(np.arange(80, 100)))
    teachers = [build_model("resnet8", 16, 10, seed=s) for s in (1, 2)]
    train_targets = ensemble_targets([logits_of(t, train) for t in teachers])
    student = build_model("resnet8", 16, 10, seed=3)
    before = float(kd_loss(logits_of(student, train), train_targets, 1.0))
    steps, best, best_step = distill_with_early_stopping(
        student, (train, train_targets), val, Schedule(60, 60, 60), 1e-2, torch.Generator().manual_seed(0)
    )
    assert steps == best_step == 60 and float(kd_loss(logits_of(student, train), train_targets, 1.0)) < 0.5 * before
    assert best == pytest.approx(feddf_method.accuracy(student, val))


class TensorBatches:
    """Given inputs and labels in `Batches`' interface, for a model without images (a linear layer)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        self.x, self.labels, self.batch_size = x, labels, batch_size

    def iterate_indexed(self, shuffle=False, augment=False, gen=None):
        order = torch.randperm(len(self.x), generator=gen) if shuffle else torch.arange(len(self.x))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield idx, self.x[idx], self.labels[idx]

    def iterate(self, shuffle=False, augment=False, gen=None):
        for _, x, y in self.iterate_indexed(shuffle, augment, gen):
            yield x, y


def linear_case(scale: float = 1.0):
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(16, 4, generator=gen) * scale, torch.randint(0, 3, (16,), generator=gen)
    targets = torch.randn(16, 3, generator=gen).mul(5).log_softmax(1)
    return nn.Linear(4, 3), TensorBatches(x, labels, 8), targets


def test_feddf_clips_a_huge_gradient_to_norm_5():
    student, data, targets = linear_case(scale=1e4)  # inputs of 10^4: the KL's gradient norm is in the thousands
    distill_with_early_stopping(student, (data, targets), data, Schedule(1, 1, 1), 1e-3, torch.Generator())
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters()]))
    assert float(norm) == pytest.approx(5.0, rel=1e-5)


def test_feddf_stops_on_validation_accuracy_and_keeps_the_best_measured_student(monkeypatch):
    student, data, targets = linear_case()
    measured, states = iter([10.0, 30.0, 20.0, 30.0, 25.0, 90.0]), []

    def scripted_accuracy(model, val, compute=None):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(measured)

    monkeypatch.setattr(feddf_method, "accuracy", scripted_accuracy)
    steps, best, best_step = distill_with_early_stopping(
        student, (data, targets), data, Schedule(100, 2, 6), 1e-2, torch.Generator().manual_seed(0)
    )
    # measured at steps 2, 4, 6, 8, 10: the best (30 %) at step 4, not beaten by the equal 30 % at step 8; at
    # step 10 six steps have passed without a higher accuracy, so the 90 % that would come at step 12 never does
    assert (steps, best, best_step, len(states)) == (10, 30.0, 4, 5)
    assert all(torch.equal(v, states[1][k]) for k, v in student.state_dict().items())


def test_feddf_and_fedbe_distil_by_default_on_the_training_images_no_one_holds():
    cfg = cfg_of(strategy="feddf")
    prepared, images = prepare(cfg), unlabeled_images(cfg)
    held = np.union1d(prepared.split.align, prepared.split.pool)
    assert len(images) == len(prepared.dataset.train) - len(held) > 5 * len(prepared.split.align)
    assert not np.any(images.labels)  # placeholders: the method sees no label
    positions = {bytes(img.numpy()) for img in images.images}
    assert not positions & {bytes(img.numpy()) for img in prepared.dataset.train.images[torch.from_numpy(held)]}


def test_client_models_hand_the_fuse_the_round_clients_and_their_sample_counts():
    seen = {}

    def fuse(models: RoundModels, metrics):
        clients = [c["w"].numpy().tolist() for c in models.clients]
        seen.update(rnd=models.server_round, clients=clients, start=models.start["w"].numpy().tolist())
        metrics["fused"] = 1.0
        return ArrayRecord({"w": torch.tensor([9.0])})

    strategy = ClientModels(fedavg(cfg_of(**{"num-clients": 2})), fuse, "test")
    strategy.inner.configure_train = lambda *args: []  # no grid to sample from: the model sent is what counts
    strategy.configure_train(3, ArrayRecord({"w": torch.tensor([0.5])}), ConfigRecord(), SimpleNamespace())
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="train")
    replies = [
        Message(
            RecordDict({"arrays": ArrayRecord({"w": torch.tensor([w])}), "metrics": MetricRecord({"num-examples": n})}),
            reply_to=request,
        )
        for w, n in ((1.0, 1), (4.0, 3))
    ]
    arrays, metrics = strategy.aggregate_train(3, replies)
    assert seen == {"rnd": 3, "clients": [[1.0], [4.0]], "start": [0.5]}
    assert arrays["w"].numpy().tolist() == [9.0] and metrics["fused"] == 1.0


# Settings and the checks before round 1


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        ({"strategy": "ratioloss", "loss": "focal"}, "the Ratio Loss is that method's client loss"),
        ({"distill-data": "/no/such/folder"}, "align or an existing folder"),
        ({"fedrs-alpha": 1.5}, "<= 1"),
        ({"fedrs-variant": "code"}, "authors, paper"),
        ({"fedlc-tau": -1.0}, ">= 0"),
        ({"feddf-steps": 0}, ">= 1"),
        ({"fedbe-epochs": 0}, ">= 1"),
        ({"loss": "ratio"}, "ce, focal, fedlc, fedrs"),
    ],
)
def test_bad_settings_of_the_new_methods_name_what_is_allowed(overrides, hint):
    with pytest.raises(ConfigError, match=hint):
        cfg_of(**overrides)


def test_preflight_stops_a_distillation_run_without_server_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="holds 0 image"):
        preflight(cfg_of(strategy="feddf", **{"distill-data": str(tmp_path)}))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    preflight(cfg_of(strategy="fedbe", **{"distill-data": str(tmp_path)}))
    with pytest.raises(
        ConfigError, match="imbalance-factor 1 the pool is all of it. holds 0 image.*expected align or a folder"
    ):
        preflight(cfg_of(strategy="feddf", **{"imbalance-factor": 1}))  # every training image is held
    preflight(cfg_of(strategy="feddf", **{"imbalance-factor": 1, "distill-data": "align"}))


def test_distilling_on_unheld_training_images_needs_a_known_split():
    with pytest.raises(ConfigError, match="not allowed with client-data=local"):
        ensemble_distillation.check(cfg_of(strategy="fedbe", **{"client-data": "local"}), None)


def test_ratio_loss_preflight_needs_every_class_in_the_auxiliary_set():
    prepared = prepare(cfg_of(strategy="ratioloss"))
    ratio_method.check({}, prepared)
    lacking = np.flatnonzero(prepared.align_source.labels[prepared.split.align] != 3)
    stub = SimpleNamespace(
        dataset=prepared.dataset,
        align_source=prepared.align_source,
        split=SimpleNamespace(align=prepared.split.align[lacking]),
    )
    with pytest.raises(ConfigError, match="no images of \\['three'\\]"):
        ratio_method.check({}, stub)


def test_the_comparison_lists_the_papers_twelve_baselines_and_the_new_long_tail_methods():
    paper = ("fedavg", "fedprox", "fedavgm", "fednova", "focal", "ratioloss", "feddf", "fedbe", "tau-norm", "ccvr")
    assert set(paper + ("creff", "clip2fl", "fedlc", "fedrs", "ours", "ours-no-align")) <= set(compare.METHODS)
    assert compare.METHODS["fedlc"] == "loss=fedlc" and compare.METHODS["ratioloss"].startswith("strategy=ratioloss ")
    assert compare.METHODS["feddf"] == "strategy=feddf"  # FedDF's own step counts: the defaults below
    defaults = cfg_of()
    assert (defaults["feddf-steps"], defaults["feddf-eval-every"], defaults["feddf-patience"]) == (10000, 100, 1000)
    assert defaults["distill-data"] == "unused-train" and defaults["fedbe-var-scale"] == 0.1


# All five through the real apps


def run_app(tmp_path, name, **overrides):
    base = {
        "num-clients": 10,
        "fraction-train": 0.2,  # 2 of 10 small partitions a round
        "num-server-rounds": 2,
        "local-epochs": 1,
        "image-size": 8,
        "projection-dim": 16,
        "eval-batch-size": 1000,
        "dirichlet-alpha": 100.0,
        "output-dir": str(tmp_path),
        "feddf-steps": 20,
        "feddf-patience": 5,
        "fedbe-samples": 2,
        "fedbe-epochs": 3,
        "align-steps": 1,
        "align-eval-every": 1,
        "pretrain-cache-dir": str(tmp_path / "pretrain-cache"),
    }
    cfg = validated({**base, **overrides})
    grid = ClientAppGrid(cfg)
    summary = server_app.run(grid, cfg, name)
    rows = read_metrics(tmp_path / name)
    return summary, rows, grid.configs


@pytest.mark.slow  # the whole ServerApp three times; each method's computations have their unit tests above
def test_the_new_methods_run_through_the_server_and_client_apps(tmp_path):
    summary, rows, configs = run_app(tmp_path, "feddf", strategy="feddf", loss="fedlc", align=True)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["ensemble-size"] == 2 for r in rows[1:])
    assert all(1 <= r["distill-steps"] <= 20 and "pre-align-accuracy" in r for r in rows[1:])
    assert "FedLC" in summary["client-runs"] and "the server distils" in summary["client-runs"]
    sent = {"server-round", "local-epochs", "lr", "momentum", "weight-decay", "augment", "partition-id"}
    assert all(set(c) == sent for c in configs)  # the training settings and the partition each message is for

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 255 - 40 * i)).save(folder / f"{i}.png")
    summary, rows, _ = run_app(tmp_path, "fedbe", strategy="fedbe", loss="fedrs", **{"distill-data": str(folder)})
    assert all(r["ensemble-size"] == 1 + 2 + 2 and r["distill-loss"] >= 0 for r in rows[1:])
    assert "FedRS" in summary["client-runs"] and str(folder) in summary["client-runs"]

    summary, rows, configs = run_app(tmp_path, "ratio", strategy="ratioloss", pretrain=True)
    assert summary["pretrain"]["teacher"] and all(c[LOSS_KEY] == "ratio" and RATIO_WEIGHTS_KEY in c for c in configs)
    for row in rows[1:]:
        composition, weights = np.array(row["ratio-composition"]), np.array(row["ratio-weights"])
        assert composition.shape == (10,) and composition.sum() == pytest.approx(1.0) and (weights >= 1.0).all()
    # digits long-tailed with IF 10: class 0 is the head, class 9 the tail
    assert rows[-1]["ratio-composition"][0] > rows[-1]["ratio-composition"][9]
    assert rows[-1]["ratio-weights"][9] > rows[-1]["ratio-weights"][0]
    assert "Ratio Loss" in client_workload(validated({"strategy": "ratioloss"}))["client-runs"]

"""FedDF, FedBE, Ratio Loss, FedLC and FedRS: each core computation against a hand-computed case, the
client and server halves in-process, and all five through the real ServerApp and ClientApp.

Models are tiny random-weight ResNet-8 configurations on the offline digits data.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from PIL import Image
from torch import nn

from bench import compare
from client_app import app as client
from flcore.class_statistics import npy_bytes
from flcore.config import ConfigError, validate
from flcore.experiment import prepare, server_data, to_record
from flcore.losses import LOSS_KEY, RATIO_WEIGHTS_KEY, LossInputs, build_loss, kd_loss, ratio_loss
from flcore.models import build_model, run_model
from server_app import app as server_app
from server_app.preflight import preflight
from strategies import ensemble_distillation
from strategies import ratio_loss as ratio_method
from strategies.ensemble_distillation import ClientModels, batches_of, logits_of
from strategies.fedavg import fedavg
from strategies.fedbe import gaussian, pseudo_labels, sample_models
from strategies.feddf import distill_until_plateau, ensemble_targets
from strategies.registry import STRATEGIES, client_workload
from tests.conftest import ClientAppGrid

pytestmark = pytest.mark.usefixtures("flower_identity")

TINY = {"num-clients": 10, "image-size": 8, "projection-dim": 16, "local-epochs": 1, "augment": False}


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg_of(**overrides):
    return validate({**TINY, **overrides}, choices={"strategy": STRATEGIES})


# FedLC and FedRS: the client's own label counts change its softmax


def test_fedlc_calibrated_logits_match_the_hand_computed_case():
    loss = build_loss(LossInputs(cfg_of(loss="fedlc", **{"fedlc-tau": 2.0}), np.array([16, 1, 0])))
    logits, label = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0])
    # tau * n^(-1/4) = 2 * [16^-0.25, 1, (1e-8)^-0.25] = [1, 2, 200] -> calibrated logits [2, -1, -200]
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(-200)))
    assert float(loss(logits, label)) == pytest.approx(expected, rel=1e-6)
    no_calibration = build_loss(LossInputs(cfg_of(loss="fedlc", **{"fedlc-tau": 0.0}), np.array([16, 1, 0])))
    assert float(no_calibration(logits, label)) == pytest.approx(float(F.cross_entropy(logits, label)))


def test_fedrs_restricted_softmax_scales_only_the_missing_classes():
    counts = np.array([5, 0, 3])
    loss = build_loss(LossInputs(cfg_of(loss="fedrs", **{"fedrs-alpha": 0.5}), counts))
    logits, label = torch.tensor([[2.0, 4.0, 0.0]]), torch.tensor([0])
    # class 1 is missing: its logit 4 becomes 2, the others stay -> p_0 = e^2 / (e^2 + e^2 + e^0)
    expected = -math.log(math.exp(2) / (2 * math.exp(2) + 1))
    assert float(loss(logits, label)) == pytest.approx(expected, rel=1e-6)
    unrestricted = build_loss(LossInputs(cfg_of(loss="fedrs", **{"fedrs-alpha": 1.0}), counts))
    assert float(unrestricted(logits, label)) == pytest.approx(float(F.cross_entropy(logits, label)))


# Ratio Loss: class weights and the monitor from the auxiliary gradients


class LinearHead(nn.Module):
    """A model whose classifier input is the image itself: the gradients of the classifier are exact by hand."""

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

    def iterate(self):
        yield self.x, self.y


def test_ratio_weights_match_the_hand_computed_case():
    # Two classes, one auxiliary image each with feature 1; logits [ln 3, 0] -> softmax [0.75, 0.25].
    # Row 0's gradient from class 0 is (0.75 - 1) * [1, 1], from class 1 0.75 * [1, 1]: Ra_0 = 0.25 / 0.75.
    head = LinearHead(torch.tensor([[math.log(3.0)], [0.0]]))
    grads = ratio_method.auxiliary_gradients(head, FeatureBatches(torch.ones(2, 1), torch.tensor([0, 1])), 2)
    assert np.allclose(grads[0], [[-0.25, -0.25], [0.25, 0.25]]) and np.allclose(
        grads[1], [[0.75, 0.75], [-0.75, -0.75]]
    )
    assert np.allclose(ratio_method.ratio_estimates(grads), [1 / 3, 3.0])
    assert np.allclose(ratio_method.class_weights(grads, 1.0, 0.1), [1 + 0.1 / 3, 1.3])


def test_ratio_monitor_recovers_the_composition_of_a_constructed_imbalance():
    """One full-batch SGD step on n_q copies of each class's auxiliary images moves the classifier by exactly
    -lr * sum_q (n_q / N) G_q, so the monitor must return n / N."""
    gen = torch.Generator().manual_seed(0)
    aux_x, aux_y = torch.randn(4, 6, generator=gen), torch.arange(4)
    head = LinearHead(torch.randn(4, 6, generator=gen) * 0.5)
    grads = ratio_method.auxiliary_gradients(head, FeatureBatches(aux_x, aux_y), 4)
    counts = np.array([50, 25, 15, 10])
    train_x, train_y = (
        aux_x.repeat_interleave(torch.from_numpy(counts), 0),
        aux_y.repeat_interleave(torch.from_numpy(counts)),
    )
    before = ratio_method.classifier_matrix(ArrayRecord(head.state_dict()))
    opt = torch.optim.SGD(head.parameters(), lr=0.3)
    F.cross_entropy(head(train_x), train_y).backward()
    opt.step()
    after = ratio_method.classifier_matrix(ArrayRecord(head.state_dict()))
    assert np.allclose(ratio_method.composition(grads, after - before), counts / counts.sum(), atol=1e-4)


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


def client_train(run_config: dict, server_config: dict) -> dict:
    cfg = cfg_of(**run_config)
    arrays = to_record(run_model(cfg, prepare(cfg).dataset.num_classes, seed=0))
    config = ConfigRecord({"server-round": 1, "local-epochs": 1, "lr": 0.1, "momentum": 0.0, "weight-decay": 0.0})
    config.update({"augment": False, **server_config})
    request = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type="train")
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 10}, RecordDict(), dict(cfg))
    return client.train_fn(request, context).content["arrays"].to_torch_state_dict()


def test_client_losses_reduce_to_cross_entropy_at_their_neutral_settings_and_change_training_otherwise():
    ce = client_train({}, {})
    same = [
        client_train({"loss": "fedlc", "fedlc-tau": 0.0}, {}),
        client_train({"loss": "fedrs", "fedrs-alpha": 1.0}, {}),
        client_train({}, {LOSS_KEY: "ratio", RATIO_WEIGHTS_KEY: npy_bytes(np.ones(10, np.float32))}),
    ]
    for state in same:
        assert all(torch.allclose(ce[k], state[k], atol=1e-6) for k in ce)
    fedlc = client_train({"loss": "fedlc"}, {})
    assert not torch.allclose(ce["classifier.bias"], fedlc["classifier.bias"])


# FedBE: the Gaussian over the client weights and the ensemble's pseudo-labels


def test_fedbe_gaussian_mean_and_variance_from_given_client_weights():
    clients = [{"w": np.array([1.0, 10.0])}, {"w": np.array([3.0, 20.0])}]
    mean, var = gaussian(clients, [1, 3], ["w"])
    # p = [0.25, 0.75]: mean = [2.5, 17.5]; var = 0.25 * [1.5, 7.5]^2 + 0.75 * [0.5, 2.5]^2 = [0.75, 18.75]
    assert np.allclose(mean["w"], [2.5, 17.5]) and np.allclose(var["w"], [0.75, 18.75])
    averaged = ArrayRecord({"w": torch.tensor([2.5, 17.5]), "count": torch.tensor([7])})
    drawn = sample_models(averaged, mean, var, 4000, np.random.default_rng(0))
    values = np.stack([m["w"].numpy() for m in drawn])
    assert np.allclose(values.mean(0), [2.5, 17.5], atol=0.1) and np.allclose(values.var(0), [0.75, 18.75], rtol=0.1)
    assert all(m["count"].numpy()[0] == 7 and m["w"].numpy().dtype == np.float32 for m in drawn[:3])


def test_fedbe_pseudo_labels_average_the_members_probabilities():
    members = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]  # probabilities .5/.5 and .75/.25
    assert torch.allclose(pseudo_labels(members).exp(), torch.tensor([[0.625, 0.375]]))


# FedDF: the averaged logits as teacher, and the student moving towards them


def test_feddf_student_moves_towards_the_ensembles_averaged_soft_labels():
    averaged = ensemble_targets([torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 2.0]])])
    assert torch.allclose(averaged.exp(), torch.softmax(torch.tensor([[2.0, 1.0]]), 1))  # mean logits [2, 1]
    cfg = cfg_of(**{"distill-batch-size": 32})
    images = server_data(cfg).align
    train, held = batches_of(cfg, images.subset(np.arange(80))), batches_of(cfg, images.subset(np.arange(80, 100)))
    teachers = [build_model("resnet8", 16, 10, seed=s) for s in (1, 2)]
    train_targets = ensemble_targets([logits_of(t, train) for t in teachers])
    held_targets = ensemble_targets([logits_of(t, held) for t in teachers])
    student = build_model("resnet8", 16, 10, seed=3)
    before = float(kd_loss(logits_of(student, train), train_targets, 1.0))
    steps, best = distill_until_plateau(
        student, (train, train_targets), (held, held_targets), 60, 60, 1e-2, torch.Generator().manual_seed(0)
    )
    assert steps == 60 and float(kd_loss(logits_of(student, train), train_targets, 1.0)) < 0.5 * before
    assert best == pytest.approx(float(kd_loss(logits_of(student, held), held_targets, 1.0)), rel=1e-5)


def test_feddf_keeps_the_averaged_model_when_distillation_never_improves_the_held_out_loss():
    cfg = cfg_of(**{"distill-batch-size": 32})
    images = server_data(cfg).align
    train, held = batches_of(cfg, images.subset(np.arange(80))), batches_of(cfg, images.subset(np.arange(80, 100)))
    student = build_model("resnet8", 16, 10, seed=3)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    own = (logits_of(student, train).log_softmax(1), logits_of(student, held).log_softmax(1))  # loss 0: nothing to gain
    steps, best = distill_until_plateau(
        student, (train, own[0]), (held, own[1]), 1000, 6, 1e-2, torch.Generator().manual_seed(0)
    )
    assert steps == 6 and best == pytest.approx(0.0, abs=1e-6)  # stopped after `patience` steps, three passes
    assert all(torch.equal(start[k], v) for k, v in student.state_dict().items())


def test_client_models_hand_the_fuse_the_round_clients_and_their_sample_counts():
    seen = {}

    def fuse(rnd, averaged, clients, examples, metrics):
        seen.update(rnd=rnd, clients=[c["w"].numpy().tolist() for c in clients], examples=examples)
        metrics["fused"] = 1.0
        return ArrayRecord({"w": torch.tensor([9.0])})

    strategy = ClientModels(fedavg(cfg_of(**{"num-clients": 2})), fuse, "test")
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="train")
    replies = [
        Message(
            RecordDict({"arrays": ArrayRecord({"w": torch.tensor([w])}), "metrics": MetricRecord({"num-examples": n})}),
            reply_to=request,
        )
        for w, n in ((1.0, 1), (4.0, 3))
    ]
    arrays, metrics = strategy.aggregate_train(3, replies)
    assert seen == {"rnd": 3, "clients": [[1.0], [4.0]], "examples": [1.0, 3.0]}
    assert arrays["w"].numpy().tolist() == [9.0] and metrics["fused"] == 1.0


# Settings and the checks before round 1


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        ({"strategy": "ratioloss", "loss": "focal"}, "the Ratio Loss is that method's client loss"),
        ({"distill-data": "/no/such/folder"}, "align or an existing folder"),
        ({"fedrs-alpha": 1.5}, "<= 1"),
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
    assert ensemble_distillation.MIN_IMAGES == 2


def test_the_comparison_lists_the_papers_twelve_baselines_and_the_new_long_tail_methods():
    paper = ("fedavg", "fedprox", "fedavgm", "fednova", "focal", "ratioloss", "feddf", "fedbe", "tau-norm", "ccvr")
    assert set(paper + ("creff", "clip2fl", "fedlc", "fedrs", "ours", "ours-no-align")) <= set(compare.METHODS)
    assert compare.METHODS["fedlc"] == "loss=fedlc" and compare.METHODS["ratioloss"] == "strategy=ratioloss"


# All five through the real apps


def run_app(tmp_path, name, **overrides):
    base = {
        "num-clients": 2,
        "fraction-train": 1.0,
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
    cfg = validate({**base, **overrides}, choices={"strategy": STRATEGIES})
    grid = ClientAppGrid(cfg)
    summary = server_app.run(grid, cfg, name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, grid.configs


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
    assert (
        "Ratio Loss"
        in client_workload(validate({"strategy": "ratioloss"}, choices={"strategy": STRATEGIES}))["client-runs"]
    )

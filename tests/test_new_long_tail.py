"""The long-tailed federated methods published after the paper (FedETF, FedLoGe, FedYoYo): each method's model, loss and
checks, and its runs through the real ServerApp and ClientApp in-process under stage 1 (`pretrain`) and stage 3
(`align`). Parity with the authors' code is in tests/test_parity_<method>.py; one `flwr run` simulation per method
is in tests/test_new_long_tail_simulation.py.

Models are tiny random-weight ResNet-8 configurations on the offline digits data.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flcore.arrays import load_record, to_record
from flcore.batches import Batches
from flcore.config import ConfigError
from flcore.datasets import ImageSet
from flcore.fedloge import ClientStep, FedLoGeClassifier, local_realign, realign_global
from flcore.losses import LOSS_KEY, LossInputs, build_loss, objective
from flcore.models import ETFClassifier, model_classifier, model_head, run_buffer_names, run_model
from flcore.personalize import fedetf_personalize, fedloge_personalize, fit, fit_local_head, new_local_head
from flcore.training import TrainSettings, train
from flcore.yoyo import EFFECTIVE_KEY, PRIOR_KEY, TwoViews, YoYoLoss, effective_numbers, training_batches
from rounds.checkpoint import load_strategy_state, strategy_state
from strategies.fedavg import sampling
from strategies.fedloge import check as fedloge_check
from strategies.fedloge import draw_sse, sse_stage, with_sse
from strategies.fedyoyo import EffectivePrior
from strategies.personalization import personal_accuracy
from strategies.registry import client_workload
from tests.helpers import TINY, validated
from tests.test_long_tail_methods import run_app

pytestmark = pytest.mark.usefixtures("flower_identity", "one_thread")


def cfg_of(**overrides):
    return validated(TINY, augment=False, **overrides)


def digits_batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=gen), torch.arange(n) % 3  # a client holding classes 0-2 only


class OneBatch:
    """The one batch a test trains on, with the `iterate` that `flcore.training.train` reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def iterate(self, **kwargs):
        yield self.x, self.y


# FedETF


def test_fedetf_model_has_the_fixed_etf_classifier_under_every_head():
    for flags in ({}, {"align": True}, {"pretrain": True}):
        cfg = cfg_of(strategy="fedetf", **flags)
        model = run_model(cfg, 10, seed=1)
        assert model_classifier(cfg) == "etf" and isinstance(model.classifier, ETFClassifier)
        assert model.head == ("mlp" if flags else "none")  # the paper's head under stage 1 or 3, FedETF's own without
        etf = model.classifier.etf
        assert etf.shape == (10, 10) and "classifier.etf" in model.state_dict()
        gram = etf.T @ etf
        torch.testing.assert_close(torch.diag(gram), torch.ones(10))
        assert "classifier.etf" in run_buffer_names(cfg)  # FedAvgM/FedNova average it plainly: it never moves
    assert torch.equal(run_model(cfg, 10, seed=1).classifier.etf, run_model(cfg, 10, seed=1).classifier.etf)
    assert model_classifier(cfg_of()) == "linear" and model_head(cfg_of(strategy="fedetf")) == "none"


def test_fedetf_client_trains_projection_and_scale_with_the_balanced_softmax_and_never_the_etf():
    cfg = cfg_of(strategy="fedetf")
    model = run_model(cfg, 10, seed=1)
    x, y = digits_batch()
    counts = np.bincount(y.numpy(), minlength=10)
    loss = build_loss(LossInputs(cfg, counts, {LOSS_KEY: "balanced-softmax"}, None))
    logits = torch.randn(4, 10)
    labels = torch.tensor([0, 1, 2, 9])
    log_n = torch.log(torch.tensor([4.0, 4.0, 4.0] + [1.0] * 7))
    expected = torch.nn.functional.cross_entropy(logits + log_n, labels)
    torch.testing.assert_close(loss(logits, labels), expected)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(
        model, OneBatch(x, y), TrainSettings(1, 0.1, 0.9, 5e-4, augment=False), torch.Generator().manual_seed(0), loss
    )
    after = model.state_dict()
    assert torch.equal(after["classifier.etf"], before["classifier.etf"])
    assert not torch.equal(after["classifier.projection.weight"], before["classifier.projection.weight"])
    assert not torch.equal(after["classifier.scale"], before["classifier.scale"])


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [({"loss": "focal"}, "balanced softmax is that method's client loss"), ({"tau-norm": 1.0}, "fixed ETF")],
)
def test_fedetf_refuses_a_second_loss_and_tau_norm(overrides, hint):
    with pytest.raises(ConfigError, match=hint):
        cfg_of(strategy="fedetf", **overrides)


def test_fedetf_personalisation_fine_tunes_a_copy_the_etf_then_the_projection():
    cfg = cfg_of(strategy="fedetf", **{"fedetf-finetune-rounds": 2, "fedetf-finetune-epochs": 1})
    model = run_model(cfg, 10, seed=1)
    x, y = digits_batch()
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.classifier
    head.etf = torch.nn.Parameter(head.etf.clone())  # as the personalisation does: the ETF trains alone first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, [head.etf], OneBatch(x, y), torch.optim.SGD([head.etf], lr=0.1), 1, False, torch.Generator())
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"classifier.etf"} and all(p.requires_grad for p in model.parameters())
    model = run_model(cfg, 10, seed=1)
    local = fedetf_personalize(model, OneBatch(x, y), cfg, np.bincount(y.numpy(), minlength=10), torch.Generator())
    assert all(torch.equal(v, sent[k]) for k, v in model.state_dict().items())  # the global model is left alone
    assert isinstance(local.classifier.etf, torch.nn.Parameter) and set(local.state_dict()) == set(sent)
    assert not torch.equal(local.classifier.etf, sent["classifier.etf"])
    assert "etf" in dict(model.classifier.named_buffers())


def test_personal_accuracy_weights_each_test_class_by_the_clients_share():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 0, 0, 0])  # recall 1, 0.5, 0
    assert personal_accuracy(preds, labels, np.array([3, 1, 0])) == pytest.approx((3 * 1 + 1 * 0.5) / 4)
    assert personal_accuracy(preds, labels, np.array([0, 0, 5])) == 0.0


@pytest.mark.slow  # one in-process run with both stages (a minute on 2 cores); the unit tests above stay fast
def test_fedetf_runs_through_the_apps_under_align_and_pretrain(tmp_path):
    personal = {"fedetf-finetune-rounds": 1, "fedetf-finetune-epochs": 1, "num-clients": 4, "fraction-train": 0.5}
    summary, rows, configs = run_app(tmp_path, "fedetf", strategy="fedetf", align=True, pretrain=True, **personal)
    assert summary["pretrain"]["teacher"] and [r["round"] for r in rows] == [0, 1, 2]
    assert all("pre-align-accuracy" in r for r in rows[1:])
    assert all(c[LOSS_KEY] == "balanced-softmax" for c in configs) and "ETF" in summary["client-runs"]
    assert rows[-1]["personalized-replies"] == 4 and len(rows[-1]["personalized-accuracies"]) == 4  # every client
    assert 0.0 <= rows[-1]["personalized-accuracy"] <= 1.0 and "personalized-accuracy" not in rows[1]
    assert "balanced softmax" in client_workload(cfg_of(strategy="fedetf"))["client-runs"]


# FedLoGe

LOGE = {"fedloge-etf-steps": 20}  # the SSE-C's optimisation, short (its authors' 10000 cost seconds)


def loge_model(cfg, classes: int = 10):
    """The run's FedLoGe model holding the SSE-C the server's stage draws for it."""
    model = run_model(cfg, classes, seed=1)
    weight, bias = draw_sse(model.embed_dim, classes, cfg.fedloge_sparsity, cfg.fedloge_etf_steps, cfg.seed)
    return load_record(model, with_sse(to_record(model), weight, bias))


def test_fedloge_model_has_the_sse_c_and_global_head_under_every_head():
    for flags in ({}, {"align": True}, {"pretrain": True}):
        cfg = cfg_of(strategy="fedloge", **LOGE, **flags)
        model = run_model(cfg, 10, seed=1)
        assert model_classifier(cfg) == "sse-c" and isinstance(model.classifier, FedLoGeClassifier)
        assert model.head == ("mlp" if flags else "none")
        head = model.classifier
        assert head.sse.shape == (10, model.embed_dim) and not head.sse.any()  # zeros until the server's stage
        assert {"classifier.sse", "classifier.sse_bias"} <= run_buffer_names(cfg)
        x = torch.randn(3, model.embed_dim)
        realigned = realign_global(head.g_aux.weight)
        torch.testing.assert_close(head(x), x @ realigned.T + head.g_aux.bias)  # the generic model
        torch.testing.assert_close(realigned.norm(dim=1), torch.full((10,), 1.7))


def test_the_sse_c_is_sparse_seeded_and_put_into_the_initial_model_only_under_fedloge():
    weight, bias = draw_sse(32, 10, 0.6, 50, seed=3)
    assert weight.shape == (10, 32) and int((weight == 0).sum()) == int(0.6 * 320)
    assert bias.abs().max() <= 1 / 32**0.5
    again, _ = draw_sse(32, 10, 0.6, 50, seed=3)
    assert torch.equal(weight, again) and not torch.equal(weight, draw_sse(32, 10, 0.6, 50, seed=4)[0])
    longer, _ = draw_sse(32, 10, 0.6, 400, seed=3)
    assert (longer.norm(dim=1) - 0.1).abs().mean() < (weight.norm(dim=1) - 0.1).abs().mean()  # towards norm 0.1
    cfg = cfg_of(strategy="fedloge", **LOGE)
    ctx = SimpleNamespace(data=SimpleNamespace(dataset=SimpleNamespace(num_classes=10)))
    [stage] = sse_stage(cfg, ctx).before_training
    model = run_model(cfg, 10, seed=1)
    outcome = stage(to_record(model))
    state = outcome.arrays.to_torch_state_dict()
    assert state["classifier.sse"].any() and outcome.sections["fedloge-sse"]["etf-steps"] == 20
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if "sse" not in k)
    assert sse_stage(cfg_of(strategy="fedetf"), ctx).before_training == []


def test_fedloge_client_trains_the_backbone_through_the_sse_c_only_and_g_aux_on_detached_features():
    cfg = cfg_of(strategy="fedloge", **LOGE)
    x, y = digits_batch()
    settings = TrainSettings(1, 0.1, 0.5, 0.0, augment=False)
    model, alone = loge_model(cfg), loge_model(cfg)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    trained, loss = objective(cfg, model, build_loss(LossInputs(cfg, np.bincount(y.numpy(), minlength=10))))
    train(trained, OneBatch(x, y), settings, torch.Generator().manual_seed(0), loss)
    after = model.state_dict()
    assert all(torch.equal(after[k], sent[k]) for k in ("classifier.sse", "classifier.sse_bias"))
    assert not torch.equal(after["classifier.g_aux.weight"], sent["classifier.g_aux.weight"])
    step = ClientStep(alone)  # the SSE-C's cross-entropy alone: the same backbone, since g_aux's loss is cut from it
    train(step, OneBatch(x, y), settings, torch.Generator().manual_seed(0), torch.nn.functional.cross_entropy)
    backbone = [k for k in after if k.startswith("backbone.") and after[k].is_floating_point()]
    assert backbone and all(torch.equal(after[k], alone.state_dict()[k]) for k in backbone)
    assert torch.equal(alone.state_dict()["classifier.g_aux.weight"], sent["classifier.g_aux.weight"])
    with pytest.raises(ValueError, match="SSE-C is all zeros"):
        objective(cfg, run_model(cfg, 10, seed=1), torch.nn.functional.cross_entropy)
    assert objective(cfg_of(), model, loss) == (model, loss)  # every other strategy trains the model itself


@pytest.mark.parametrize(
    ("overrides", "hint"), [({"loss": "focal"}, "with cross-entropy"), ({"tau-norm": 1.0}, "realigned")]
)
def test_fedloge_refuses_a_second_loss_and_tau_norm(overrides, hint):
    with pytest.raises(ConfigError, match=hint):
        cfg_of(strategy="fedloge", **overrides)


def test_fedloge_needs_a_classifier_input_as_wide_as_the_classes():
    prepared = SimpleNamespace(dataset=SimpleNamespace(num_classes=100))
    with pytest.raises(ConfigError, match="at least as wide as the 100 classes"):
        fedloge_check(cfg_of(strategy="fedloge", align=True, **{"projection-dim": 16}), prepared)
    fedloge_check(cfg_of(strategy="fedloge"), prepared)  # ResNet-8's 256 features


def test_fedloge_personalisation_adds_a_local_head_to_the_realigned_global_head_and_masks_absent_classes():
    cfg = cfg_of(strategy="fedloge", **LOGE, **{"fedloge-local-epochs": 2})
    model = loge_model(cfg)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits_batch()
    counts = np.bincount(y.numpy(), minlength=10)
    local = fedloge_personalize(model, OneBatch(x, y), cfg, counts, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, sent[k]) for k, v in model.state_dict().items())  # the global model is left alone
    state = local.state_dict()
    assert set(state) == set(sent) and all(torch.equal(state[k], sent[k]) for k in sent if "classifier" not in k)
    assert not state["classifier.row_norm"].any() and state["classifier.allowed"].tolist() == [1] * 3 + [0] * 7
    preds = local.eval()(x).argmax(1)
    assert set(preds.tolist()) <= {0, 1, 2}  # a class the client has no images of never wins
    l_head = fit_local_head(
        model, new_local_head(model, torch.Generator().manual_seed(0)), OneBatch(x, y),
        TrainSettings(2, cfg.lr, cfg.momentum, cfg.weight_decay, augment=False), torch.Generator().manual_seed(0),
    )  # fmt: skip
    features = model.embed(x).detach()
    expected = l_head(features) + features @ local_realign(model.classifier.g_aux.weight, l_head.weight).T
    expected = expected + model.classifier.g_aux.bias
    torch.testing.assert_close(local(x)[:, :3], expected[:, :3])


@pytest.mark.slow  # one in-process run with both stages (a minute on 2 cores); the unit tests above stay fast
def test_fedloge_runs_through_the_apps_under_align_and_pretrain(tmp_path):
    personal = {"fedloge-local-epochs": 1, "num-clients": 4, "fraction-train": 0.5, **LOGE}
    summary, rows, _ = run_app(tmp_path, "fedloge", strategy="fedloge", align=True, pretrain=True, **personal)
    assert summary["pretrain"]["teacher"] and [r["round"] for r in rows] == [0, 1, 2]
    assert all("pre-align-accuracy" in r for r in rows[1:])
    assert summary["fedloge-sse"]["etf-steps"] == 20 and "SSE-C" in summary["client-runs"]
    assert rows[-1]["personalized-replies"] == 4 and len(rows[-1]["personalized-accuracies"]) == 4  # every client
    assert 0.0 <= rows[-1]["personalized-accuracy"] <= 1.0 and "personalized-accuracy" not in rows[1]


# FedYoYo


def tiny_batches(size: int = 8, n: int = 10, batch: int = 4) -> Batches:
    """`n` random uint8 images of classes 0-2 (natural: flipped when augmented), in batches of `batch`."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    data = ImageSet(np.arange(n) % 3, images)
    return Batches(data, SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3, natural=True), size, batch)


@pytest.mark.parametrize("size", [8, 32])
def test_fedyoyo_trains_on_the_weak_view_then_the_strong_view_of_every_batch(size):
    batches = tiny_batches(size)
    views = training_batches({LOSS_KEY: "fedyoyo"}, batches)
    assert isinstance(views, TwoViews) and training_batches({}, batches) is batches and len(views) == len(batches)
    plain = list(batches.iterate())
    for augment in (False, True):
        seen = list(views.iterate(augment=augment, gen=torch.Generator().manual_seed(1)))
        again = list(views.iterate(augment=augment, gen=torch.Generator().manual_seed(1)))
        for (x, y), (x2, _), (p, py) in zip(seen, again, plain, strict=True):
            n = len(py)
            assert x.shape == (2 * n, 3, size, size) and torch.equal(y, torch.cat([py, py])) and torch.equal(x, x2)
            assert torch.equal(x[:n], p) != augment  # no augmentation: the weak view is the plain batch
            assert not torch.equal(x[n:], p)  # AutoAugment and Cutout always make the strong view
    holes = [(x[len(x) // 2 :] == batches.normalise(torch.zeros(1, 3, 1, 1))).all(1) for x, _ in seen]
    assert all(h.flatten(1).sum(1).min() >= (size // 2) ** 2 // 4 for h in holes)  # a cut of half the side, clipped


def test_fedyoyo_client_loss_comes_from_the_round_config():
    cfg = cfg_of(strategy="fedyoyo")
    counts = np.array([6, 3, 1, 0])
    prior = [0.4, 0.3, 0.2, 0.1]
    loss = build_loss(LossInputs(cfg, counts, {LOSS_KEY: "fedyoyo", PRIOR_KEY: prior, "server-round": 10}))
    assert isinstance(loss, YoYoLoss) and loss.weight == pytest.approx(4.0 * 10 / 50)
    torch.testing.assert_close(loss.local, torch.tensor([0.6, 0.3, 0.1, 0.0]))
    logits, labels = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    loss(logits, labels)
    torch.testing.assert_close(loss.prior, 0.9 * torch.tensor(prior) + 0.1 * loss.local)  # one step towards its own
    late = build_loss(LossInputs(cfg, counts, {LOSS_KEY: "fedyoyo", PRIOR_KEY: prior, "server-round": 200}))
    assert late.weight == 4.0  # lambda after the warm-up
    for bad in ({}, {PRIOR_KEY: [0.5, 0.5]}, {PRIOR_KEY: [0.5, 0.5, 0.0, 0.0]}):
        with pytest.raises(ValueError, match=PRIOR_KEY):
            build_loss(LossInputs(cfg, counts, {LOSS_KEY: "fedyoyo", "server-round": 1, **bad}))


def test_fedyoyo_refuses_a_second_loss_and_takes_resnet8_with_a_linear_classifier():
    with pytest.raises(ConfigError, match="fedyoyo"):
        cfg_of(strategy="fedyoyo", loss="fedlc")
    cfg = cfg_of(strategy="fedyoyo")
    assert model_head(cfg) == "none" and model_classifier(cfg) == "linear"
    assert "effective number" in client_workload(cfg)["client-uploads"]
    assert "AutoAugment" in client_workload(cfg)["client-runs"]


def test_fedyoyo_effective_numbers_are_per_class_of_the_received_model():
    cfg = cfg_of(strategy="fedyoyo")
    model, batches = run_model(cfg, 4, seed=1), tiny_batches(n=12)
    first = effective_numbers(model, batches, 4, torch.Generator().manual_seed(0))
    again = effective_numbers(model, batches, 4, torch.Generator().manual_seed(0))
    assert first.shape == (4,) and np.array_equal(first, again) and first[3] == 0  # class 3: none of its images
    assert (first[:3] >= len(batches) - 1).all()  # at least one per batch holding the class


class EffectiveGrid:
    """Four nodes; the effective-number query answered from `answers` (node -> numbers), nothing else expected."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def get_node_ids(self):
        return [0, 1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.asked.append((msg.metadata.dst_node_id, msg.metadata.message_type))
            metrics = MetricRecord({"num-examples": 5, EFFECTIVE_KEY: self.answers[msg.metadata.dst_node_id]})
            replies.append(Message(RecordDict({"metrics": metrics}), reply_to=msg))
        return replies


def test_fedyoyo_server_asks_the_sampled_clients_then_sends_its_ema_prior():
    cfg = cfg_of(strategy="fedyoyo", **{"fraction-train": 1.0})
    strategy = EffectivePrior(FedAvg(**sampling(cfg)), 10.0, 100.0)
    grid = EffectiveGrid({0: [1.0, 2.0, 0.0], 1: [3.0, 0.0, 2e6], 2: [1.0, 1.0, 1.0], 3: [1.0, 1.0, float("nan")]})
    arrays = ArrayRecord({"classifier.bias": torch.zeros(3)})
    config = ConfigRecord({"server-round": 1})
    messages = list(strategy.configure_train(1, arrays, config, grid))
    assert sorted(node for node, _ in grid.asked) == [0, 1, 2, 3]
    assert {kind for _, kind in grid.asked} == {"query.effective_numbers"}
    effective = np.array([6.0, 4.0, 0.0])  # ones + nodes 0-2 (node 3's NaN is left out); 2e6 + 2 is abnormal
    effective[2] = effective[:2].mean()
    np.testing.assert_allclose(strategy.effective, effective)
    for message in messages:
        config = message.content["config"]
        assert config[LOSS_KEY] == "fedyoyo" and config["server-round"] == 1
        np.testing.assert_allclose(config[PRIOR_KEY], effective / effective.sum(), rtol=1e-6)
    grid.answers = {node: [9.0, 0.0, 0.0] for node in range(4)}
    strategy.configure_train(2, arrays, ConfigRecord({"server-round": 2}), grid)
    np.testing.assert_allclose(strategy.effective, 0.9 * effective + 0.1 * np.array([37.0, 1.0, 1.0]), rtol=1e-6)
    _, metrics = strategy.aggregate_train(2, [])
    assert metrics["yoyo-effective-replies"] == 4 and len(metrics["yoyo-prior"]) == 3
    resumed = EffectivePrior(FedAvg(**sampling(cfg)), 10.0, 100.0)
    load_strategy_state(resumed, strategy_state(strategy))  # what a checkpoint keeps of it
    np.testing.assert_array_equal(resumed.effective, strategy.effective)


@pytest.mark.slow  # one in-process run with both stages; the unit tests above stay fast
def test_fedyoyo_runs_through_the_apps_under_align_and_pretrain(tmp_path):
    small = {"num-clients": 4, "fraction-train": 0.5}
    summary, rows, configs = run_app(tmp_path, "fedyoyo", strategy="fedyoyo", align=True, pretrain=True, **small)
    assert summary["pretrain"]["teacher"] and [r["round"] for r in rows] == [0, 1, 2]
    assert all("pre-align-accuracy" in r for r in rows[1:]) and all(r["replies"] == 2 for r in rows[1:])
    assert all(r["yoyo-effective-replies"] == 2 and sum(r["yoyo-prior"]) == pytest.approx(1) for r in rows[1:])
    assert len(configs) == 4 and all(c[LOSS_KEY] == "fedyoyo" and len(c[PRIOR_KEY]) == 10 for c in configs)
    assert "AutoAugment" in summary["client-runs"]

"""Strategies and long-tail baselines in-process: hand-built replies, the client's train function called directly.

Models here are tiny ResNet-8 configurations with random weights on the offline digits data.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flcore import config as config_module
from flcore.config import ConfigError
from flcore.losses import LOSSES, LossInputs, build_loss, focal_loss
from strategies.fedavgm import FedAvgM, ServerSGD
from strategies.fednova import FedNova
from strategies.registry import build_strategy
from strategies.tau_norm import tau_norm_stage, tau_normalize
from tests import helpers
from tests.helpers import ONE_CLIENT, TINY, train_reply, validated

pytestmark = pytest.mark.usefixtures("flower_identity")


def reply(state: dict, n: int, steps: int = 10) -> Message:
    return train_reply(state, n, metrics={"local-steps": steps, "train-loss": 1.0})


class FakeGrid:
    """Just enough of a Grid for configure_train: all `num-clients` (default 20) nodes connected."""

    def get_node_ids(self):
        return list(range(1, 21))


def states(seed: int) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    glob = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    clients = [{k: v + torch.randn(v.shape, generator=gen) for k, v in glob.items()} for _ in range(3)]
    return glob, clients


def run_round(strategy, glob: dict, clients: list[dict], examples, steps) -> dict:
    strategy.configure_train(1, ArrayRecord(glob), ConfigRecord(), FakeGrid())
    replies = [reply(c, n, t) for c, n, t in zip(clients, examples, steps, strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()


def fedavg_of(clients, examples):
    total = sum(examples)
    return {k: sum(c[k] * (n / total) for c, n in zip(clients, examples, strict=True)) for k in clients[0]}


def test_fednova_with_equal_steps_equals_fedavg():
    glob, clients = states(0)
    got = run_round(build_strategy(validated(strategy="fednova")), glob, clients, [5, 10, 20], [7, 7, 7])
    ref = run_round(build_strategy(validated(strategy="fedavg")), glob, clients, [5, 10, 20], [7, 7, 7])
    for k in glob:
        assert torch.allclose(got[k], ref[k], atol=1e-6)
        assert torch.allclose(got[k], fedavg_of(clients, [5, 10, 20])[k], atol=1e-6)


def test_fednova_normalises_unequal_steps_by_hand():
    glob = {"w": torch.zeros(2)}
    clients = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    got = run_round(build_strategy(validated(strategy="fednova")), glob, clients, [1, 1], [1, 4])
    # d = 0.5*(-[1,0])/1 + 0.5*(-[0,4])/4 = [-0.5,-0.5]; tau_eff = 2.5 -> w = [1.25, 1.25]; FedAvg gives [0.5, 2]
    assert torch.allclose(got["w"], torch.tensor([1.25, 1.25]))


def test_fednova_averages_batchnorm_buffers_plainly_and_normalises_only_trained_weights():
    var, count = "backbone.stem.1.running_var", "backbone.stem.1.num_batches_tracked"
    glob = {"w": torch.zeros(2), var: torch.ones(3), count: torch.tensor(10)}
    clients = [{"w": torch.tensor([1.0, 0.0]), var: torch.full((3,), 2.0), count: torch.tensor(11)}]
    clients.append({"w": torch.tensor([0.0, 5.0]), var: torch.full((3,), 2.0), count: torch.tensor(13)})
    got = run_round(build_strategy(validated(strategy="fednova")), glob, clients, [1, 1], [1, 5])
    assert torch.allclose(got[var], torch.full((3,), 2.0))  # normalised like a weight it would be 2.8
    assert float(got[count]) == 12.0  # FedAvg's weighted mean (normalised: 12.4)
    # d = 0.5*(-[1,0])/1 + 0.5*(-[0,5])/5 = [-0.5,-0.5]; tau_eff = 3 -> w = [1.5, 1.5]; FedAvg gives [0.5, 2.5]
    assert torch.allclose(got["w"], torch.tensor([1.5, 1.5]))


def test_buffer_names_are_the_models_running_statistics():
    from flcore.models import buffer_names, build_model

    names = buffer_names("resnet8", 16)
    model = build_model("resnet8", 16, 10)
    assert names == set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    assert "backbone.stem.1.running_var" in names and "classifier.weight" not in names
    assert len(buffer_names("resnet50", 16)) == 3 * 53  # 53 BatchNorm layers, three buffers each


def test_fednova_requires_local_steps_and_a_configured_round():
    glob, clients = states(1)
    strategy = FedNova(build_strategy(validated()))
    with pytest.raises(RuntimeError, match="configure_train"):
        strategy.aggregate_train(1, [reply(c, 1) for c in clients])


def test_fedavgm_without_momentum_and_unit_lr_equals_fedavg_but_momentum_differs():
    glob, clients = states(2)
    plain = build_strategy(validated(strategy="fedavgm", server_momentum=0.0, server_lr=1.0))
    ref = build_strategy(validated(strategy="fedavg"))
    moving = build_strategy(validated(strategy="fedavgm", server_momentum=0.9))
    outs = {}
    for name, strategy in (("plain", plain), ("ref", ref), ("moving", moving)):
        g = glob
        for rnd in range(2):  # two rounds, so momentum would have kicked in; clients move on in round 2
            moved = [{k: v + rnd for k, v in c.items()} for c in clients]
            g = run_round(strategy, g, moved, [3, 1, 2], [5, 5, 5])
        outs[name] = g
    assert all(torch.allclose(outs["plain"][k], outs["ref"][k], atol=1e-6) for k in glob)
    assert not torch.allclose(outs["moving"]["w"], outs["ref"]["w"], atol=1e-3)


def test_fedavgm_moves_parameters_with_momentum_but_sets_buffers_to_their_mean():
    """Momentum on a BatchNorm running variance carries it past every client's value: with the clients'
    variances falling 0.5 -> 0.1, Flower's FedAvgM (momentum on every array) sends it below zero in round 2,
    which makes the logits NaN. Here the buffers are the clients' weighted mean, in their own dtype."""
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

    buffers = {"bn.running_var", "bn.num_batches_tracked"}
    glob = {"w": torch.ones(3), "bn.running_var": torch.ones(3), "bn.num_batches_tracked": torch.tensor(0)}
    ours = FedAvgM(FedAvg(fraction_evaluate=0.0), ServerSGD(lr=1.0, momentum=0.9, nesterov=False), buffers)
    flower = FlowerFedAvgM(server_learning_rate=1.0, server_momentum=0.9, fraction_evaluate=0.0)
    got = {}
    for name, strategy in (("ours", ours), ("flower", flower)):
        g = glob
        for var, batches in ((0.5, 7), (0.1, 14)):
            clients = [
                {
                    "w": torch.zeros(3),
                    "bn.running_var": torch.full((3,), var),
                    "bn.num_batches_tracked": torch.tensor(batches),
                }
            ] * 2
            g = run_round(strategy, g, clients, [1, 3], [5, 5])
        got[name] = g
    assert (got["flower"]["bn.running_var"] < 0).all()
    assert torch.allclose(got["ours"]["bn.running_var"], torch.full((3,), 0.1))
    assert (
        got["ours"]["bn.num_batches_tracked"].dtype == torch.int64 and int(got["ours"]["bn.num_batches_tracked"]) == 14
    )
    assert torch.allclose(got["ours"]["w"], got["flower"]["w"])  # parameters: the same plain-momentum step
    assert torch.allclose(got["ours"]["w"], torch.full((3,), -0.9))  # 1 - 1 = 0, then 0 - (0.9 * 1 + 0)


def test_fedprox_sends_mu_and_aggregates_like_fedavg():
    glob, clients = states(3)
    prox = build_strategy(validated(strategy="fedprox", proximal_mu=0.25))
    (msg, *_) = prox.configure_train(1, ArrayRecord(glob), ConfigRecord(), FakeGrid())
    assert msg.content["config"]["proximal-mu"] == 0.25
    got = run_round(prox, glob, clients, [1, 2, 3], [4, 4, 4])
    ref = fedavg_of(clients, [1, 2, 3])
    assert all(torch.allclose(got[k], ref[k], atol=1e-6) for k in glob)


def client_train(run_config: dict, server_config: dict, model_seed: int = 0) -> Message:
    return helpers.client_train(validated(ONE_CLIENT, **run_config), server_config, model_seed)


def weights(msg: Message) -> dict:
    return msg.content["arrays"].to_torch_state_dict()


def test_fedprox_with_zero_mu_trains_exactly_like_fedavg_on_the_same_seed():
    fedavg = weights(client_train({"strategy": "fedavg"}, {}))
    prox0 = weights(client_train({"strategy": "fedprox", "proximal-mu": 0.0}, {"proximal-mu": 0.0}))
    prox = weights(client_train({"strategy": "fedprox"}, {"proximal-mu": 5.0}))
    assert all(torch.equal(fedavg[k], prox0[k]) for k in fedavg)
    assert not torch.allclose(fedavg["classifier.weight"], prox["classifier.weight"])


def test_run_config_mu_alone_adds_no_proximal_term():
    """Only FedProx's round config turns the proximal term on, so fedavg runs keep the default mu harmless."""
    a = weights(client_train({"strategy": "fedavg", "proximal-mu": 5.0}, {}))
    b = weights(client_train({"strategy": "fedavg", "proximal-mu": 0.0}, {}))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_client_reports_cost_metrics_and_uses_the_configured_loss():
    ce = client_train({"loss": "ce"}, {})
    focal = client_train({"loss": "focal", "focal-gamma": 2.0}, {})
    metrics = ce.content["metrics"]
    arrays_bytes = ce.content["arrays"].count_bytes()
    assert arrays_bytes < metrics["upload-bytes"] < arrays_bytes + 1000
    assert metrics["peak-rss-mb"] > 10
    assert focal.content["metrics"]["train-loss"] < metrics["train-loss"]  # focal down-weights every example


def test_focal_with_zero_gamma_equals_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(64, 10, generator=gen) * 3, torch.randint(0, 10, (64,), generator=gen)
    assert torch.allclose(focal_loss(logits, labels, gamma=0.0), F.cross_entropy(logits, labels))
    assert focal_loss(logits, labels, gamma=2.0) < F.cross_entropy(logits, labels)
    loss = build_loss(LossInputs(validated(loss="focal", focal_gamma=0.0), np.ones(10)))
    assert torch.allclose(loss(logits, labels), F.cross_entropy(logits, labels))
    assert set(LOSSES) == set(config_module.LOSSES)


def test_tau_norm_zero_leaves_the_model_unchanged_and_one_makes_unit_rows():
    gen = torch.Generator().manual_seed(0)
    state = {"classifier.weight": torch.randn(5, 8, generator=gen) * 3, "classifier.bias": torch.randn(5)}
    arrays = ArrayRecord(state)
    same = tau_normalize(arrays, 0.0).to_torch_state_dict()
    assert all(torch.equal(same[k], state[k]) for k in state)
    unit = tau_normalize(arrays, 1.0).to_torch_state_dict()
    assert np.allclose(unit["classifier.weight"].norm(dim=1).numpy(), 1.0, atol=1e-6)
    assert torch.equal(unit["classifier.bias"], state["classifier.bias"])
    half = tau_normalize(arrays, 0.5).to_torch_state_dict()["classifier.weight"].norm(dim=1)
    assert torch.allclose(half, state["classifier.weight"].norm(dim=1).sqrt(), atol=1e-5)


def test_tau_norm_stage_acts_on_the_last_round_only():
    assert tau_norm_stage(validated(tau_norm=0.0), None).post_hoc == []
    (stage,) = tau_norm_stage(validated(tau_norm=1.0, num_server_rounds=3), None).post_hoc
    arrays = ArrayRecord({"classifier.weight": torch.full((2, 4), 2.0)})
    metrics = MetricRecord()
    assert stage(2, arrays, metrics).arrays is arrays and "tau-norm" not in metrics
    final = stage(3, arrays, metrics).arrays.to_torch_state_dict()["classifier.weight"]
    assert torch.allclose(final, torch.full((2, 4), 0.5)) and metrics["tau-norm"] == 1.0


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        ({"strategy": "scaffold"}, "fedavg, fedprox, fedavgm, fednova"),
        ({"server-momentum": 1.5}, "<= 0.999"),
        ({"proximal-mu": -0.1}, ">= 0"),
        ({"server-lr": 0.0}, "> 0"),
        ({"loss": "mse"}, "ce, focal"),
        ({"focal-gamma": -1.0}, ">= 0"),
        ({"tau-norm": 3.0}, "<= 2"),
    ],
)
def test_bad_strategy_settings_name_what_is_allowed(overrides, hint):
    with pytest.raises(ConfigError, match=hint):
        validated(overrides)


def test_ccvr_pooling_of_client_statistics_is_exact():
    from strategies.ccvr import pooled_gaussians

    gen = np.random.default_rng(0)
    feats, labels = gen.normal(size=(60, 4)), np.repeat([0, 1, 2], 20)
    parts = [slice(0, 13), slice(13, 45), slice(45, 60)]  # class 0 split 13/7, class 1 7/13, class 2 only on client 2

    def stats(f, y):
        counts = np.array([(y == c).sum() for c in range(3)], float)
        means = np.stack([f[y == c].mean(0) if (y == c).any() else np.zeros(4) for c in range(3)])
        covs = np.stack([np.cov(f[y == c].T) if (y == c).sum() > 1 else np.zeros((4, 4)) for c in range(3)])
        return {"counts": counts, "means": means, "covs": covs}

    counts, means, covs = pooled_gaussians([stats(feats[p], labels[p]) for p in parts])
    full = stats(feats, labels)
    assert np.allclose(counts, full["counts"]) and np.allclose(means, full["means"]) and np.allclose(covs, full["covs"])


def test_creff_gradient_matching_reduces_the_distance():
    from strategies.creff import FederatedFeatures

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    real = torch.randn(30, 8, generator=gen) + 2 * torch.eye(3, 8).repeat_interleave(10, 0)
    labels = torch.arange(3).repeat_interleave(10)
    grads_w, grads_b = [], []
    for c in range(3):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        F.cross_entropy(F.linear(real[labels == c], w, b), labels[labels == c]).backward()
        grads_w.append(w.grad.numpy())
        grads_b.append(b.grad.numpy())
    upload = {"counts": np.full(3, 10.0), "grad-weight": np.stack(grads_w), "grad-bias": np.stack(grads_b)}
    ff = FederatedFeatures.random(3, 8, 5, gen)
    first = ff.match(weight, bias, [upload], epochs=1, lr=0.1)
    later = ff.match(weight, bias, [upload], epochs=50, lr=0.1)
    assert later < 0.5 * first


def test_client_uploads_ask_in_chosen_rounds_and_calibrate_after_fedavg():
    from flcore.class_statistics import encode
    from strategies.class_uploads import ClientUploads

    calls = []

    def calibrate(rnd, arrays, uploads, metrics):
        calls.append((rnd, float(uploads[0]["x"].sum() + uploads[1]["x"].sum())))
        metrics["calibrated"] = 1.0
        return ArrayRecord({k: v * 0 for k, v in arrays.to_torch_state_dict().items()})

    strategy = ClientUploads(build_strategy(validated()), "feature-stats", lambda rnd: rnd == 2, calibrate)
    config = ConfigRecord({"lr": 0.1})
    (msg, *_) = strategy.configure_train(1, ArrayRecord({"w": torch.ones(2)}), config, FakeGrid())
    assert "upload" not in msg.content["config"]
    (msg, *_) = strategy.configure_train(2, ArrayRecord({"w": torch.ones(2)}), config, FakeGrid())
    assert msg.content["config"]["upload"] == "feature-stats" and "upload" not in config
    replies = [reply({"w": torch.ones(2) * k}, 1) for k in (1, 3)]
    for k, r in zip((1, 3), replies, strict=True):
        r.content["uploads"] = encode({"x": np.full(2, float(k))})
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert calls == [(2, 8.0)] and metrics["calibrated"] == 1.0
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.zeros(2))


def test_a_reply_with_a_bad_or_misshapen_upload_is_dropped_whole_and_the_round_goes_on():
    from flcore.class_statistics import encode
    from rounds.guard import screen
    from strategies.class_uploads import ClientUploads

    seen = []

    def calibrate(rnd, arrays, uploads, metrics):
        seen.extend(float(u["x"].sum()) for u in uploads)
        return arrays

    strategy = ClientUploads(build_strategy(validated()), "feature-stats", lambda rnd: True, calibrate)
    strategy.configure_train(1, ArrayRecord({"w": torch.ones(2)}), ConfigRecord(), FakeGrid())
    replies = [reply({"w": torch.full((2,), float(k))}, 1) for k in (1, 3, 50, 70, 90, 110)]
    replies[0].content["uploads"] = encode({"x": np.full(2, 1.0)})
    replies[1].content["uploads"] = encode({"x": np.full(2, 3.0)})
    replies[2].content["uploads"] = encode({"x": np.array([1.0, np.nan])})
    replies[3].content["uploads"] = ConfigRecord({"x": b"not an npy payload"})
    replies[5].content["uploads"] = encode({"x": np.ones(3)})  # finite, but not the shape the others sent
    checked = screen(replies, ArrayRecord({"w": torch.ones(2)}))  # replies[4] sent no upload at all
    assert len(checked.rejected) == 4 and "upload" in checked.rejected[0][1]
    arrays, _ = strategy.aggregate_train(1, checked.accepted)
    assert seen == [2.0, 6.0]
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((2,), 2.0))


@pytest.mark.parametrize(
    ("upload", "keys"),
    [("feature-stats", {"counts", "means", "covs"}), ("class-gradients", {"counts", "grad-weight", "grad-bias"})],
)
def test_client_sends_requested_upload_computed_on_the_received_model(upload, keys):
    from flcore.class_statistics import decode

    plain = client_train({}, {})
    asked = client_train({}, {"upload": upload})
    sent = decode(asked.content["uploads"])
    assert set(sent) == keys and sent["counts"].sum() == plain.content["metrics"]["num-examples"]
    extra = asked.content["uploads"].count_bytes()
    assert asked.content["metrics"]["upload-bytes"] == pytest.approx(plain.content["metrics"]["upload-bytes"] + extra)
    assert all(torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(asked).values(), strict=True))


def test_creff_server_sends_its_head_and_replaces_the_classifier_after_matching():
    from flcore.class_statistics import client_upload, decode, encode
    from strategies.class_uploads import ClientUploads
    from strategies.creff import CReFFServer

    cfg = validated(strategy="creff", calibration_epochs=3, match_epochs=3, virtual_per_class=4)
    server = CReFFServer(cfg)
    strategy = ClientUploads(
        build_strategy(validated()), "class-gradients", lambda rnd: True, server, False, server.head
    )
    glob = {"classifier.weight": torch.zeros(3, 5), "classifier.bias": torch.zeros(3), "w": torch.ones(2)}
    (msg, *_) = strategy.configure_train(1, ArrayRecord(glob), ConfigRecord(), FakeGrid())
    config = msg.content["config"]
    assert {"upload", "upload-head-weight", "upload-head-bias"} <= set(config)

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(5, 3)

        def embed(self, x):
            return x

    feats, labels = torch.randn(6, 5), np.array([0, 0, 1, 1, 2, 2])
    data = type("D", (), {"labels": labels})()
    batches = type("B", (), {"data": data, "take": lambda self, rows: feats[torch.as_tensor(rows)]})()
    upload = decode(client_upload(config, Backbone(), batches, 3))
    head_w = torch.from_numpy(server.head(ArrayRecord(glob))["weight"])
    assert upload["grad-weight"].shape == (3, 3, 5) and not np.allclose(upload["grad-weight"], 0)
    replies = [reply({k: v + 1 for k, v in glob.items()}, 2), reply({k: v + 3 for k, v in glob.items()}, 2)]
    for r in replies:
        r.content["uploads"] = encode(upload)
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    assert torch.allclose(got["w"], torch.full((2,), 3.0)) and metrics["match-loss"] >= 0
    assert not torch.allclose(got["classifier.weight"], torch.full((3, 5), 2.0))  # re-trained, not the average
    assert not torch.allclose(got["classifier.weight"], head_w)
    (msg, *_) = strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid())
    sent = msg.content["arrays"].to_torch_state_dict()
    assert torch.allclose(sent["classifier.weight"], torch.full((3, 5), 2.0))  # clients train the plain FedAvg model


KD = {"kd-weight": 1.0, "kd-temperature": 3.0}


@pytest.fixture
def counted_teacher(monkeypatch, teacher_calls):
    """Counts CLIP forwards over a client's partition; the teacher is the tiny open_clip config, RANDOM weights."""
    from client_app import distill

    monkeypatch.setattr(distill, "_CACHE", {})
    print("CLIP2FL teacher: tiny open_clip config with RANDOM weights")
    return teacher_calls


def test_clip2fl_with_zero_kd_weight_trains_exactly_like_creff(counted_teacher):
    creff = client_train({"strategy": "creff", "head": "linear"}, {"upload": "class-gradients"})  # CLIP2FL's model
    zero = client_train(
        {"strategy": "clip2fl", "kd-weight": 0.0}, {"upload": "class-gradients", **KD, "kd-weight": 0.0}
    )
    kd = client_train({"strategy": "clip2fl"}, {"upload": "class-gradients", **KD})
    assert counted_teacher  # the teacher did run for kd-weight 0: the term is there, weighted 0
    assert all(torch.equal(a, b) for a, b in zip(weights(creff).values(), weights(zero).values(), strict=True))
    assert not torch.allclose(weights(creff)["classifier.weight"], weights(kd)["classifier.weight"])
    assert kd.content["metrics"]["train-loss"] > creff.content["metrics"]["train-loss"]  # CE + a positive KL term


def test_clip2fl_teacher_runs_once_per_client_process_across_rounds(counted_teacher):
    first = client_train({"strategy": "clip2fl"}, KD)
    second = client_train({"strategy": "clip2fl"}, {**KD, "server-round": 2}, model_seed=1)
    assert counted_teacher == [first.content["metrics"]["num-examples"]]
    assert second.content["metrics"]["num-examples"] == counted_teacher[0]


def test_kd_loss_is_zero_for_equal_logits_and_scales_with_t_squared():
    from flcore.losses import kd_loss

    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    assert kd_loss(p, p, 3.0).abs() < 1e-6
    by_hand = (F.softmax(q / 3, 1) * (F.log_softmax(q / 3, 1) - F.log_softmax(p / 3, 1))).sum(1).mean() * 9
    assert torch.allclose(kd_loss(p, q, 3.0), by_hand, atol=1e-6)


def test_clip2fl_server_asks_for_gradients_and_distillation_every_round_and_describes_it():
    from strategies.registry import client_workload

    cfg = validated(strategy="clip2fl", kd_weight=0.5, kd_temperature=2.0)
    strategy = build_strategy(cfg)
    glob = {"classifier.weight": torch.zeros(3, 5), "classifier.bias": torch.zeros(3)}
    for rnd in (1, 2):
        (msg, *_) = strategy.configure_train(rnd, ArrayRecord(glob), ConfigRecord({"lr": 0.1}), FakeGrid())
        config = msg.content["config"]
        assert config["kd-weight"] == 0.5 and config["kd-temperature"] == 2.0
        assert config["upload"] == "class-gradients" and config["lr"] == 0.1
    runs = client_workload(cfg)["client-runs"]
    assert "CLIP teacher tiny" in runs and "ON THE CLIENT" in runs and "per-class CE gradients" in runs
    assert "CLIP" not in client_workload(validated(strategy="creff"))["client-runs"]


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [({"kd-weight": -1.0}, ">= 0"), ({"kd-temperature": 0.0}, "> 0"), ({"kd-temperature": "hot"}, "expected float")],
)
def test_bad_clip2fl_settings_name_what_is_allowed(overrides, hint):
    with pytest.raises(ConfigError, match=f"kd-.*{hint}"):
        validated({"strategy": "clip2fl", **overrides})


def test_client_rejects_a_bad_distillation_round_config_before_training():
    with pytest.raises(ValueError, match="kd-temperature = 0.0 must be > 0"):
        client_train({"strategy": "clip2fl"}, {**KD, "kd-temperature": 0.0})


def pairwise_text_contrast(features, labels, text, temperature):
    """CLIP2FL's N x N form written out row by row: anchor i against every other row j's class text feature."""
    losses = []
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if j != i]
        positives = [j for j in others if labels[j] == labels[i]]
        if not positives:
            continue
        logit = {j: float(features[i] @ text[labels[j]]) / temperature for j in others}
        log_denominator = np.log(sum(np.exp(v) for v in logit.values()))
        losses.append(-np.mean([logit[j] - log_denominator for j in positives]))
    return float(np.mean(losses))


def test_clip2fl_text_contrast_matches_a_hand_computed_case_and_clip2fl_pairwise_form():
    from strategies.clip2fl import text_contrast_loss

    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # row 0: others have logits 2 (row 1, class 0) and 0 (row 2): -(2 - log(e^2 + 1)) = log(1 + e^-2)
    # row 1: others have logits 0 and 0: -(0 - log 2) = log 2; row 2 is alone in class 1 and left out
    by_hand = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert text_contrast_loss(feats, labels, text, 1.0).item() == pytest.approx(by_hand, rel=1e-6)
    assert text_contrast_loss(feats, labels, text, 0.5).item() == pytest.approx(
        pairwise_text_contrast(feats.numpy(), labels.numpy(), text.numpy(), 0.5), rel=1e-6
    )
    gen = torch.Generator().manual_seed(0)
    feats, text = torch.randn(13, 6, generator=gen), F.normalize(torch.randn(4, 6, generator=gen), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 0, 1, 2])
    assert text_contrast_loss(feats, labels, text, 0.1).item() == pytest.approx(
        pairwise_text_contrast(feats.numpy(), labels.numpy(), text.numpy(), 0.1), rel=1e-5
    )


def creff_round(strategy, glob: dict, num_classes: int, seed: int = 0):
    """One round of a CReFF-style strategy on hand-built replies whose uploads are real class gradients."""
    from flcore.class_statistics import HEAD_KEYS, encode, read_npy

    (msg, *_) = strategy.configure_train(1, ArrayRecord(glob), ConfigRecord(), FakeGrid())
    config = msg.content["config"]
    head_w, head_b = (torch.from_numpy(read_npy(HEAD_KEYS[k], config[HEAD_KEYS[k]])) for k in ("weight", "bias"))
    gen = torch.Generator().manual_seed(seed)
    grads_w, grads_b = [], []
    for c in range(num_classes):
        w, b = head_w.clone().requires_grad_(True), head_b.clone().requires_grad_(True)
        real = torch.randn(4, head_w.shape[1], generator=gen) + 2 * torch.eye(num_classes, head_w.shape[1])[c]
        F.cross_entropy(F.linear(real, w, b), torch.full((4,), c)).backward()
        grads_w.append(w.grad.numpy())
        grads_b.append(b.grad.numpy())
    upload = {"counts": np.full(num_classes, 4.0), "grad-weight": np.stack(grads_w), "grad-bias": np.stack(grads_b)}
    replies = [reply({k: v + 1 for k, v in glob.items()}, 2), reply({k: v + 3 for k, v in glob.items()}, 2)]
    for r in replies:
        r.content["uploads"] = encode(upload)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict(), metrics


SMALL_CREFF = {"calibration_epochs": 2, "match_epochs": 3, "virtual_per_class": 4, "projection_dim": 8}


def test_clip2fl_with_zero_contrast_weight_is_the_creff_server_exactly(monkeypatch):
    from strategies import clip2fl

    monkeypatch.setattr(clip2fl, "class_text_features", lambda cfg: pytest.fail("no teacher for weight 0"))
    glob = {"classifier.weight": torch.zeros(10, 8), "classifier.bias": torch.zeros(10), "w": torch.ones(2)}
    creff, creff_metrics = creff_round(build_strategy(validated(strategy="creff", **SMALL_CREFF)), glob, 10)
    zero_cfg = validated(strategy="clip2fl", contrast_weight=0.0, **SMALL_CREFF)
    zero, zero_metrics = creff_round(build_strategy(zero_cfg), glob, 10)
    assert all(torch.equal(creff[k], zero[k]) for k in creff)
    assert zero_metrics["match-loss"] == creff_metrics["match-loss"] and "contrast-loss" not in zero_metrics


def test_clip2fl_server_contrast_uses_the_teachers_text_features_once_and_changes_the_classifier(
    teacher_calls, monkeypatch
):
    from strategies import clip2fl

    made, real = [], clip2fl.class_text_features

    def counted(cfg):
        made.append(real(cfg))
        return made[-1]

    monkeypatch.setattr(clip2fl, "class_text_features", counted)
    glob = {"classifier.weight": torch.zeros(10, 8), "classifier.bias": torch.zeros(10), "w": torch.ones(2)}
    cfg = validated(strategy="clip2fl", contrast_weight=1.0, **SMALL_CREFF)  # tiny CLIP at projection-dim 8
    strategy = build_strategy(cfg)
    got, metrics = creff_round(strategy, glob, 10)
    creff_round(strategy, glob, 10)
    creff, _ = creff_round(build_strategy(validated(strategy="creff", **SMALL_CREFF)), glob, 10)
    assert metrics["contrast-loss"] > 0 and not torch.allclose(got["classifier.weight"], creff["classifier.weight"])
    assert len(made) == 1 and made[0].shape == (10, 8)  # digits' ten class names, once for the run
    assert torch.allclose(made[0].norm(dim=1), torch.ones(10))
    assert teacher_calls == []  # the server encodes text only, never an image


def test_clip2fl_text_contrast_moves_federated_features_towards_their_class_text():
    from strategies.clip2fl import TextContrast
    from strategies.creff import FederatedFeatures

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    grads = {"grad-weight": np.zeros((3, 3, 8)), "grad-bias": np.zeros((3, 3))}
    for c in range(3):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        F.cross_entropy(F.linear(torch.randn(5, 8, generator=gen), w, b), torch.full((5,), c)).backward()
        grads["grad-weight"][c], grads["grad-bias"][c] = w.grad.numpy(), b.grad.numpy()
    upload = {"counts": np.full(3, 5.0), **grads}
    text = F.normalize(torch.randn(3, 8, generator=gen), dim=1)

    def cosine(ff):
        return F.cosine_similarity(ff.features, text.double()[ff.labels], dim=1).mean().item()

    plain, pulled = (FederatedFeatures.random(3, 8, 6, torch.Generator().manual_seed(1)) for _ in range(2))
    start = cosine(plain)
    plain.match(weight, bias, [upload], epochs=30, lr=0.1)
    pulled.match(weight, bias, [upload], epochs=30, lr=0.1, extra=TextContrast(lambda: text, 1.0, 0.1))
    assert cosine(pulled) > start + 0.1 and cosine(pulled) > cosine(plain) + 0.1


def test_clip2fl_preflight_needs_projection_dim_equal_to_the_teachers_embedding(monkeypatch):
    from alignment import teacher
    from server_app.preflight import preflight, validated

    monkeypatch.setattr(teacher, "_cached_weights", lambda name, tag: None)  # whatever this machine has cached

    with pytest.raises(ConfigError, match=r"'projection-dim' = 64 .* ViT-B-32's embedding size 512.*contrast-weight=0"):
        preflight(validated({"strategy": "clip2fl", "align-teacher": "ViT-B-32", "projection-dim": 64}))
    with pytest.raises(ConfigError, match="ViT-B-32 / openai is not in the local cache"):
        preflight(validated({"strategy": "clip2fl", "align-teacher": "ViT-B-32", "projection-dim": 512}))
    no_contrast = {"contrast-weight": 0.0, "projection-dim": 64}
    preflight(validated({"strategy": "clip2fl", "align-teacher": "ViT-B-32", **no_contrast}))


def test_clip2fl_refuses_a_model_whose_features_are_not_the_teachers_width():
    """Without a head the federated features are ResNet-8's 256-d, which the 512-d text features cannot contrast."""
    from server_app.preflight import preflight, validated

    with pytest.raises(ConfigError, match=r"'head' = 'none' .*clip2fl.*256-d .*512-d"):
        preflight(validated({"strategy": "clip2fl", "head": "none"}))
    preflight(validated({"strategy": "clip2fl", "head": "none", "contrast-weight": 0.0}))


def test_clip2fl_prompt_setting_is_checked():
    with pytest.raises(ConfigError, match="clip2fl-prompt.*exactly one"):
        validated({"clip2fl-prompt": "a photo"})
    assert validated({"clip2fl-prompt": "ensemble"})["clip2fl-prompt"] == "ensemble"


def test_ccvr_calibrates_on_statistics_of_the_final_aggregate_and_keeps_its_backbone(tmp_path):
    """Luo et al.: statistics under the final aggregated model, from every client, after the last aggregation."""
    from flwr.serverapp.strategy import FedAvg

    from flcore.arrays import load_record, to_record
    from flcore.class_statistics import decode, feature_statistics
    from flcore.models import run_model
    from flcore.run_data import client_batches, prepare
    from tests.helpers import ClientAppGrid, served

    class KeepingReplies(ClientAppGrid):
        def answer(self, msg):
            reply = super().answer(msg)
            self.pairs.append((msg, reply))
            return reply

    cfg = validated(TINY, augment=False, strategy="ccvr", calibration_epochs=5)
    grid = KeepingReplies(cfg)
    grid.pairs = []
    strategy = build_strategy(cfg)
    seen = {}
    calibrate = strategy.calibrate

    def recording(rnd, arrays, uploads, metrics):
        seen.update(rnd=rnd, arrays=arrays, uploads=uploads)
        return calibrate(rnd, arrays, uploads, metrics)

    strategy.calibrate = recording
    classes = prepare(cfg).dataset.num_classes
    result = served(strategy, seed=7).start(grid, to_record(run_model(cfg, classes, seed=0)), num_rounds=2)

    trained = [(m, r) for m, r in grid.pairs if m.metadata.message_type == "train"]
    assert len(trained) == 4 and [c["server-round"] for c in grid.configs] == [1, 1, 2, 2]
    last = trained[2:]
    final, _ = FedAvg().aggregate_train(2, [r for _, r in sorted(last, key=lambda p: p[0].metadata.dst_node_id)])
    final = final.to_torch_state_dict()
    assert seen["rnd"] == 2
    assert all(
        torch.allclose(seen["arrays"].to_torch_state_dict()[k].float(), final[k].float(), atol=1e-6) for k in final
    )
    queries = [(m, r) for m, r in grid.pairs if m.metadata.message_type == "query.upload"]
    assert [m.metadata.dst_node_id for m, _ in queries] == [0, 1, 2, 3]  # every client, trained last round or not
    assert all(len(r.content.array_records) == 0 for _, r in queries)  # statistics only, no training
    model = run_model(cfg, classes)
    for pid, upload in enumerate(seen["uploads"]):
        local = feature_statistics(load_record(model, ArrayRecord(final)), client_batches(cfg, pid), classes)
        assert np.array_equal(upload["counts"], local["counts"])
        assert np.allclose(upload["means"], local["means"], atol=1e-5)
        assert np.allclose(upload["covs"], local["covs"], atol=1e-5)
        assert np.allclose(decode(queries[pid][1].content["uploads"])["means"], local["means"], atol=1e-5)
    out = result.arrays.to_torch_state_dict()
    backbone = [k for k in final if not k.startswith("classifier.")]
    assert all(torch.allclose(out[k].float(), final[k].float(), atol=1e-6) for k in backbone)
    assert not torch.allclose(out["classifier.weight"], final["classifier.weight"])
    # CCVR's own model: statistics and classifier on ResNet-8's 256-d features, no projection
    assert seen["uploads"][0]["covs"].shape == (classes, 256, 256) and out["classifier.weight"].shape == (classes, 256)
    assert not any(k.startswith("projection.") for k in out)


def full_class_gradients(model, batches, num_classes: int) -> dict[str, np.ndarray]:
    """The reference for a class of at most 32 images: one mean-CE gradient of the model's classifier over all
    of the class's features, no draws."""
    from flcore.class_statistics import class_features, classifier_grad

    feats, labels = class_features(model, batches)
    weight, bias = (
        p.detach().to(feats.device, torch.float64) for p in (model.classifier.weight, model.classifier.bias)
    )
    grad_w = np.zeros((num_classes, *weight.shape), np.float32)
    for c in range(num_classes):
        if (labels == c).any():
            grad_w[c] = classifier_grad(feats[labels == c], c, weight, bias, create_graph=False)[0].cpu().numpy()
    return {"grad-weight": grad_w}


def test_creff_client_gradients_are_drawn_as_the_authors_with_seeded_dsa():
    """CReFF's `compute_gradient`: 10 draws of up to 32 images per class, each with one siamese DSA transform
    (`creff-dsa`), from the client's seeded generator; off, a class of at most 32 images gives its full mean."""
    from flcore.class_statistics import REAL_DRAWS, UploadRequest, drawn_class_gradients
    from flcore.dsa import augment
    from flcore.models import run_model
    from flcore.run_data import client_batches

    cfg = validated(ONE_CLIENT, strategy="creff")
    model, batches = run_model(cfg, 10, seed=0), client_batches(cfg, 0)

    def upload(dsa, seed=3):
        return drawn_class_gradients(model, batches, 10, UploadRequest(None, torch.Generator().manual_seed(seed), dsa))

    on, again, other, off = upload(True), upload(True), upload(True, seed=4), upload(False)
    assert np.array_equal(on["grad-weight"], again["grad-weight"])  # seeded
    assert not np.allclose(on["grad-weight"], other["grad-weight"]) and not np.allclose(
        on["grad-weight"], off["grad-weight"]
    )
    assert on["grad-weight"].shape == (10, 10, 256)
    counts = np.bincount(batches.data.labels, minlength=10)
    assert np.array_equal(on["counts"], counts)
    full = full_class_gradients(model, batches, 10)
    small = (counts > 0) & (counts <= 32)
    assert small.any() and np.allclose(off["grad-weight"][small], full["grad-weight"][small], atol=1e-6)
    assert REAL_DRAWS == 10
    x = torch.randn(4, 3, 8, 8)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(y, augment(x, torch.Generator().manual_seed(0)))


def test_creff_runs_through_the_client_app_on_its_own_model():
    """CReFF's model (ResNet-8 -> Linear(256, C)) in-process: class gradients of the 256-d classifier from
    every client, DSA-augmented and seeded, federated features of that width, a re-trained classifier."""
    from flcore.arrays import to_record
    from flcore.models import run_model
    from flcore.run_data import prepare
    from tests.helpers import ClientAppGrid, RecordingReport, served

    small = {"match-epochs": 2, "calibration-epochs": 2, "virtual-per-class": 4}
    cfg = validated(ONE_CLIENT, fraction_train=0.2, strategy="creff", **small)  # 2 of 10 small partitions a round
    classes = prepare(cfg).dataset.num_classes
    start = to_record(run_model(cfg, classes, seed=0))

    def one_run():
        report = RecordingReport()
        strategy = build_strategy(cfg)
        result = served(strategy, report=report, seed=7).start(ClientAppGrid(cfg), start, num_rounds=2)
        return result.arrays.to_torch_state_dict(), report.train, strategy.calibrate.features

    out, metrics, features = one_run()
    assert out["classifier.weight"].shape == (classes, 256) and not any(k.startswith("projection.") for k in out)
    assert features.features.shape == (classes * 4, 256)
    assert all(np.isfinite(metrics[r]["match-loss"]) for r in (1, 2))
    again, _, features_again = one_run()
    assert all(torch.equal(out[k], again[k]) for k in out)  # the clients' DSA draws are seeded
    assert torch.equal(features.features, features_again.features)


@pytest.mark.usefixtures("one_thread")
def test_ccvr_under_alignment_takes_statistics_of_the_aligned_model_and_tau_norm_stays_last(tmp_path):
    """The clients' class statistics describe the model they end with: the last aggregate after stage 3."""
    from flcore.arrays import load_record, to_record
    from flcore.metrics import summarize
    from flcore.models import build_model
    from flcore.run_data import prepare
    from flcore.server_data import server_data
    from flcore.training import predict
    from rounds.stage import ServerContext
    from strategies.registry import build_server_strategy
    from tests.helpers import ClientAppGrid, RecordingReport

    run = {"strategy": "ccvr", "num-server-rounds": 1, "align": True, "align-steps": 1, "align-lr": 0.5}
    run.update({"calibration-epochs": 1, "tau-norm": 1.0, "output-dir": str(tmp_path)})
    cfg = validated(TINY, augment=False, **run)
    data, classes = server_data(cfg), prepare(cfg).dataset.num_classes

    def new_model(seed=None):
        return build_model("resnet8", 16, classes, seed=seed)

    def evaluate(arrays):
        return summarize(*predict(load_record(new_model(), arrays), data.test), classes, data.groups)

    strategy = build_server_strategy(cfg, ServerContext(cfg, data, new_model, evaluate), RecordingReport()).strategy
    align = strategy.stages.after_aggregation[0]  # stage 3, the first after-aggregation stage
    seen = {}

    def recorded(rnd, arrays, metrics):
        outcome = align(rnd, arrays, metrics)
        seen.update(aggregate=arrays.to_torch_state_dict(), aligned=outcome.arrays.to_torch_state_dict())
        return outcome

    strategy.stages.after_aggregation[0] = recorded
    grid = ClientAppGrid(cfg)
    result = strategy.start(grid, to_record(new_model(seed=0)), num_rounds=1)

    queries = [m for m in grid.requests if m.metadata.message_type == "query.upload"]
    assert len(queries) == 4
    moved = [
        k for k, v in seen["aligned"].items() if v.is_floating_point() and not torch.equal(v, seen["aggregate"][k])
    ]
    assert "backbone.stem.0.weight" in moved  # alignment changed the backbone, so the order matters
    for query in queries:
        sent = query.content["arrays"].to_torch_state_dict()
        assert all(torch.equal(sent[k], v) for k, v in seen["aligned"].items())
    out = result.arrays.to_torch_state_dict()
    assert all(torch.equal(out[k], v) for k, v in seen["aligned"].items() if not k.startswith("classifier."))
    assert torch.allclose(out["classifier.weight"].norm(dim=1), torch.ones(classes), atol=1e-5)  # tau-norm after CCVR


def test_upload_only_replies_must_carry_no_model_and_finite_uploads():
    from flcore.class_statistics import encode
    from rounds.guard import screen

    def upload_reply(node, value, arrays=None):
        content = RecordDict({"metrics": MetricRecord({"num-examples": 3}), "uploads": encode({"x": value})})
        if arrays is not None:
            content["arrays"] = ArrayRecord(arrays)
        request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="query.upload")
        return Message(content, reply_to=request)

    replies = [upload_reply(1, np.ones(2)), upload_reply(2, np.array([1.0, np.nan])), upload_reply(3, np.ones(2))]
    replies.append(upload_reply(4, np.ones(2), arrays={"w": torch.ones(2)}))
    checked = screen(replies, None, with_model=False)
    assert [r.metadata.src_node_id for r in checked.accepted] == [1, 3]
    assert sorted(node for node, _ in checked.rejected) == [2, 4]

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flcore.arrays import load_record, read_npy
from flcore.class_statistics import encode
from flcore.models import build_model
from flcore.reports import METRICS, RunReport, read_metrics
from rounds.stage import Outcome, ServerStage, Stages
from strategies.registry import STRATEGIES, build_strategy
from strategies.wrapper import ServerStages
from tests.helpers import InProcessGrid, served, train_reply, validated

pytestmark = pytest.mark.usefixtures("flower_identity")


def reply(state: dict, n: int) -> Message:
    return train_reply(state, n, metrics={"loss": float(n)})


def test_fedavg_weights_by_num_examples():
    strategy = build_strategy(validated())
    a = {"w": torch.zeros(3), "count": torch.tensor(2)}
    b = {"w": torch.ones(3) * 4, "count": torch.tensor(6)}
    arrays, metrics = strategy.aggregate_train(1, [reply(a, 1), reply(b, 3)])
    got = arrays.to_torch_state_dict()
    assert torch.allclose(got["w"].float(), torch.full((3,), 3.0))  # (0*1 + 4*3) / 4
    assert metrics["loss"] == (1 * 1 + 3 * 3) / 4


def test_stages_run_after_aggregation_in_order_and_the_report_gets_what_they_measured(tmp_path):
    calls = []

    def double(rnd, arrays, metrics):
        calls.append(("double", rnd))
        state = arrays.to_torch_state_dict()
        metrics["doubled"] = 1.0
        return Outcome(ArrayRecord({k: v * 2 for k, v in state.items()}), {"doubling": {"factor": 2}})

    def record(rnd, arrays, metrics):
        calls.append(("record", rnd, metrics["doubled"]))
        return Outcome(arrays)

    report = RunReport(tmp_path, 4, ["a", "b"])
    inner = build_strategy(validated())
    wrapped = ServerStages(inner, Stages(after_aggregation=[double, record]), report)
    arrays, metrics = wrapped.aggregate_train(4, [reply({"w": torch.ones(2)}, 1), reply({"w": torch.ones(2) * 3}, 1)])
    assert calls == [("double", 4), ("record", 4, 1.0)]
    assert np.allclose(arrays["w"].numpy(), [4.0, 4.0])
    assert report.sections == {"doubling": {"factor": 2}}
    assert json.loads((tmp_path / "doubling.json").read_text()) == {"factor": 2}
    assert not (tmp_path / METRICS).exists()  # no row before the round's evaluation
    report.record_eval(4, {"accuracy": 0.5, "balanced-accuracy": 0.5})
    assert read_metrics(tmp_path)[-1]["doubled"] == 1.0  # the round's metrics waited for its evaluation row


def test_load_record_restores_integer_buffers_after_fedavg():
    model = build_model("resnet8", 32, 3, seed=0)
    strategy = build_strategy(validated())
    arrays, _ = strategy.aggregate_train(1, [reply(model.state_dict(), 2), reply(model.state_dict(), 5)])
    assert arrays["backbone.stem.1.num_batches_tracked"].numpy().dtype == np.float64
    load_record(model, arrays)
    assert model.state_dict()["backbone.stem.1.num_batches_tracked"].dtype == torch.int64


def test_server_stage_registry_wires_hooks_and_start_applies_initial_stages(monkeypatch, tmp_path):
    from rounds.policy import RoundPolicy
    from strategies import registry

    def bump(arrays):
        return Outcome(ArrayRecord({k: v + 1 for k, v in arrays.to_torch_state_dict().items()}))

    def noop(rnd, arrays, metrics):
        return Outcome(arrays)

    entry = ServerStage(lambda cfg, ctx: Stages([bump], [noop], {"test": {"built": True}}))
    monkeypatch.setitem(registry.SERVER_STAGES, "test", entry)
    cfg = validated()
    report = RunReport(tmp_path, 1, ["a"])
    built = registry.build_server_strategy(cfg, ctx=None, report=report)
    wrapped = built.strategy
    assert wrapped.stages.before_training == [bump] and wrapped.stages.after_aggregation == [noop]
    assert isinstance(built.policy, RoundPolicy)
    seen = {}

    def evaluate(rnd, arrays):
        seen[rnd] = arrays.to_torch_state_dict()["w"]

    wrapped.start(None, ArrayRecord({"w": torch.zeros(2)}), num_rounds=0, evaluate_fn=evaluate)
    assert torch.equal(seen[0], torch.ones(2))
    assert report.sections["test"] == {"built": True}  # what the factory measured reaches the report


class EchoGrid(InProcessGrid):
    """Four clients that send back the model they received unchanged, with whatever upload the method asks for.

    Uploads are fixed random arrays of the right shapes (3 classes, 4 features), so CCVR's and CReFF's
    calibrations run; `requests` keeps every message except the partition queries.
    """

    def __init__(self):
        super().__init__()
        self.requests = []

    def get_node_ids(self):
        return [1, 2, 3, 4]

    def answer(self, msg):
        if msg.metadata.message_type == "query":
            return Message(
                RecordDict({"metrics": MetricRecord({"partition-id": msg.metadata.dst_node_id})}), reply_to=msg
            )
        self.requests.append(msg)
        config, content = msg.content["config"], RecordDict()
        if "upload" in config:
            content["uploads"] = encode(fake_upload(str(config["upload"])))
        if msg.metadata.message_type == "train":
            content["arrays"] = ArrayRecord(msg.content["arrays"].to_torch_state_dict())  # a copy, as on the wire
            content["metrics"] = MetricRecord({"num-examples": 2, "local-steps": 3})
        else:
            content["metrics"] = MetricRecord({"num-examples": 2})
        return Message(content, reply_to=msg)


def fake_upload(name: str) -> dict:
    gen = np.random.default_rng(0)
    counts = np.full(3, 2.0)
    if name == "feature-stats":
        return {"counts": counts, "means": gen.normal(size=(3, 4)), "covs": np.stack([np.eye(4) * 0.1] * 3)}
    return {"counts": counts, "grad-weight": gen.normal(size=(3, 3, 4)), "grad-bias": gen.normal(size=(3, 3))}


KEEPS_CLIENT_CLASSIFIER = {"creff", "clip2fl"}  # clients train the plain aggregate's classifier, not the global one
CLASSIFIER = ("classifier.weight", "classifier.bias")


SERVER_MODEL = {"feddf", "fedbe", "ratioloss"}  # run the model on server data: need the real architecture's weights


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in SERVER_MODEL])
def test_the_last_stage_output_is_the_next_global_model_and_the_base_of_the_strategys_update(name):
    """Round 1's stage sets every weight to 5; clients change nothing. Round 2 must send 5 and, since no
    client moved it, the strategy's own update must leave it at 5 (FedAvgM's momentum reference, FedNova's
    normalisation base, CReFF's aggregate). CReFF's clients keep the plain aggregate's classifier."""
    from rounds.stage import Outcome

    cfg = validated(
        {
            "strategy": name,
            "num-clients": 4,
            "fraction-train": 1.0,
            "num-server-rounds": 2,
            "virtual-per-class": 2,
            "match-epochs": 2,
            "calibration-epochs": 2,
            "contrast-weight": 0.0,  # CLIP2FL's text contrast needs 4-d text features; the mechanics are CReFF's
        },
    )
    gen = torch.Generator().manual_seed(0)
    initial = {"w": torch.randn(2, generator=gen), "classifier.weight": torch.randn(3, 4, generator=gen)}
    initial["classifier.bias"] = torch.randn(3, generator=gen)

    def constant_in_round_1(rnd, arrays, metrics):
        if rnd != 1:
            return Outcome(arrays)
        return Outcome(ArrayRecord({k: torch.full_like(v, 5.0) for k, v in arrays.to_torch_state_dict().items()}))

    grid = EchoGrid()
    result = served(build_strategy(cfg), [constant_in_round_1]).start(grid, ArrayRecord(initial), num_rounds=2)
    round_2 = [m for m in grid.requests if m.metadata.message_type == "train"][4:]
    assert len(round_2) == 4
    for msg in round_2:
        sent = msg.content["arrays"].to_torch_state_dict()
        assert torch.equal(sent["w"], torch.full((2,), 5.0))
        for key in CLASSIFIER:
            expected = initial[key] if name in KEEPS_CLIENT_CLASSIFIER else torch.full_like(initial[key], 5.0)
            assert torch.allclose(sent[key], expected, atol=1e-6), key
        if name in KEEPS_CLIENT_CLASSIFIER:  # the class gradients are computed with the global (stage's) classifier
            head = read_npy("upload-head-weight", msg.content["config"]["upload-head-weight"])
            assert np.array_equal(head, np.full((3, 4), 5.0))
    final = result.arrays.to_torch_state_dict()
    assert torch.allclose(final["w"], torch.full((2,), 5.0), atol=1e-6)
    if name in ("fedavg", "fedprox", "fedavgm", "fednova"):
        assert all(torch.allclose(final[k], torch.full_like(final[k], 5.0), atol=1e-6) for k in CLASSIFIER)


@pytest.mark.parametrize("name", sorted(SERVER_MODEL))
def test_strategies_that_run_the_model_on_server_data_send_the_last_stage_output(name):
    """FedDF, FedBE and the Ratio Loss run the real model on D_align: with its weights, round 2 must send what
    round 1's last stage made (their own update is FedAvg of what clients send back, then server work)."""
    from flcore.models import run_model
    from rounds.stage import Outcome

    cfg = validated(
        {"strategy": name, "num-clients": 4, "fraction-train": 1.0, "num-server-rounds": 2, "projection-dim": 8}
        | {
            "image-size": 8,
            "feddf-steps": 2,
            "feddf-patience": 1,
            "fedbe-samples": 1,
            "fedbe-epochs": 1,
            "distill-data": "align",
        },
    )
    initial = run_model(cfg, 10, seed=0).state_dict()

    def constant_in_round_1(rnd, arrays, metrics):
        if rnd != 1:
            return Outcome(arrays)
        return Outcome(ArrayRecord({k: torch.full_like(v, 5.0) for k, v in arrays.to_torch_state_dict().items()}))

    grid = EchoGrid()
    served(build_strategy(cfg), [constant_in_round_1]).start(grid, ArrayRecord(initial), num_rounds=2)
    round_2 = [m for m in grid.requests if m.metadata.message_type == "train"][4:]
    assert len(round_2) == 4
    for msg in round_2:
        sent = msg.content["arrays"].to_torch_state_dict()
        assert all(torch.allclose(v.double(), torch.full_like(v.double(), 5.0)) for v in sent.values())

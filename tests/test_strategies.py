import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flcore.config import validate
from flcore.experiment import load_record
from flcore.models import build_model
from flcore.reports import RunReport
from rounds.stage import Outcome, ServerStage, Stages
from strategies.registry import STRATEGIES, build_strategy
from strategies.wrapper import ServerStages

pytestmark = pytest.mark.usefixtures("flower_identity")


def reply(state: dict, n: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n, "loss": float(n)})})
    return Message(content, reply_to=request)


def test_fedavg_weights_by_num_examples():
    strategy = build_strategy(validate({}, choices={"strategy": STRATEGIES}))
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
    inner = build_strategy(validate({}, choices={"strategy": STRATEGIES}))
    wrapped = ServerStages(inner, Stages(after_aggregation=[double, record]), report)
    arrays, metrics = wrapped.aggregate_train(4, [reply({"w": torch.ones(2)}, 1), reply({"w": torch.ones(2) * 3}, 1)])
    assert calls == [("double", 4), ("record", 4, 1.0)]
    assert np.allclose(arrays["w"].numpy(), [4.0, 4.0])
    assert report.sections == {"doubling": {"factor": 2}}
    assert json.loads((tmp_path / "doubling.json").read_text()) == {"factor": 2}
    assert report._pending[4]["doubled"] == 1.0  # the round's metrics wait for its evaluation row


def test_load_record_restores_integer_buffers_after_fedavg():
    model = build_model("resnet8", 32, 3, seed=0)
    strategy = build_strategy(validate({}, choices={"strategy": STRATEGIES}))
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
    cfg = validate({}, choices={"strategy": STRATEGIES})
    report = RunReport(tmp_path, 1, ["a"])
    wrapped = registry.build_server_strategy(cfg, ctx=None, report=report)
    assert wrapped.stages.before_training == [bump] and wrapped.stages.after_aggregation == [noop]
    assert isinstance(wrapped.inner, RoundPolicy)
    seen = {}

    def evaluate(rnd, arrays):
        seen[rnd] = arrays.to_torch_state_dict()["w"]

    wrapped.start(None, ArrayRecord({"w": torch.zeros(2)}), num_rounds=0, evaluate_fn=evaluate)
    assert torch.equal(seen[0], torch.ones(2))
    assert report.sections["test"] == {"built": True}  # what the factory measured reaches the report

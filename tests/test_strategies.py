import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flcore.config import validate
from flcore.experiment import load_record
from flcore.models import build_model
from strategies.registry import STRATEGIES, build_strategy
from strategies.stages import ServerStages

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


def test_stages_run_after_aggregation_in_order_and_keep_inner_result():
    calls = []

    def double(rnd, arrays, metrics):
        calls.append(("double", rnd))
        state = arrays.to_torch_state_dict()
        metrics["doubled"] = 1.0
        return ArrayRecord({k: v * 2 for k, v in state.items()})

    def record(rnd, arrays, metrics):
        calls.append(("record", rnd, metrics["doubled"]))
        return arrays

    inner = build_strategy(validate({}, choices={"strategy": STRATEGIES}))
    wrapped = ServerStages(inner, after_aggregation=[double, record])
    arrays, metrics = wrapped.aggregate_train(4, [reply({"w": torch.ones(2)}, 1), reply({"w": torch.ones(2) * 3}, 1)])
    assert calls == [("double", 4), ("record", 4, 1.0)]
    assert np.allclose(arrays["w"].numpy(), [4.0, 4.0])
    assert metrics["replies"] == 2


def test_load_record_restores_integer_buffers_after_fedavg():
    model = build_model("resnet8", 32, 3, seed=0)
    strategy = build_strategy(validate({}, choices={"strategy": STRATEGIES}))
    arrays, _ = strategy.aggregate_train(1, [reply(model.state_dict(), 2), reply(model.state_dict(), 5)])
    assert arrays["backbone.stem.1.num_batches_tracked"].numpy().dtype == np.float64
    load_record(model, arrays)
    assert model.state_dict()["backbone.stem.1.num_batches_tracked"].dtype == torch.int64


def test_server_stage_registry_wires_hooks_and_start_applies_initial_stages(monkeypatch):
    from strategies import registry
    from strategies.stages import Stages

    def bump(arrays):
        return ArrayRecord({k: v + 1 for k, v in arrays.to_torch_state_dict().items()})

    def noop(rnd, arrays, metrics):
        return arrays

    def observer(rnd, arrays, metrics):
        return arrays

    monkeypatch.setitem(registry.SERVER_STAGES, "test", lambda cfg, ctx: Stages([bump], [noop]))
    cfg = validate({}, choices={"strategy": STRATEGIES})
    wrapped = registry.build_server_strategy(cfg, ctx=None, observers=[observer])
    assert wrapped.before_training == [bump] and wrapped.after_aggregation == [noop, observer]
    seen = {}

    def evaluate(rnd, arrays):
        seen[rnd] = arrays.to_torch_state_dict()["w"]

    wrapped.start(None, ArrayRecord({"w": torch.zeros(2)}), num_rounds=0, evaluate_fn=evaluate)
    assert torch.equal(seen[0], torch.ones(2))

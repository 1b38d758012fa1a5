"""No run reports a success it did not earn: NaN models are never adopted, a run that aggregated nothing
fails, and reports never land in the working directory."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from alignment.stage import check_inputs
from flcore.config import ConfigError
from flcore.run_data import prepare
from flcore.training import NonFiniteLogits, predict
from rounds import checkpoint
from rounds.policy import RoundPolicy
from rounds.stage import NonFiniteModel, Outcome, Stages
from server_app import app as server_app
from server_app import launch
from strategies.registry import build_strategy
from strategies.wrapper import BrokenModel, ServerStages, StageError
from tests.helpers import (
    GLOBAL,
    TINY,
    InProcessGrid,
    RecordingReport,
    begin_round,
    run_config,
    served,
    train_reply,
    validated,
)

pytestmark = pytest.mark.usefixtures("flower_identity")


def nan_stage(server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> Outcome:
    return Outcome(ArrayRecord({k: torch.full(tuple(a.shape), float("nan")) for k, a in arrays.items()}))


def test_nan_logits_file_is_refused_naming_the_key(tmp_path, no_superlink, capsys):
    cfg = validated({**TINY, "align": True, "output-dir": str(tmp_path)})
    prep = prepare(cfg)
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full((len(prep.split.align), prep.dataset.num_classes), np.nan, np.float32))
    with pytest.raises(ConfigError, match="'align-logits-file'.*NaN or Inf"):
        check_inputs(cfg.with_(align_logits_file=str(bad)), prep.dataset, prep.split.align)
    assert launch.main(["--run-config", run_config({**TINY, "align": True, "align-logits-file": str(bad)})]) == 2
    assert "NaN or Inf" in capsys.readouterr().err


def test_a_stage_returning_nan_weights_stops_the_run_naming_the_stage():
    strategy = served(build_strategy(validated()), after_aggregation=[nan_stage])
    begin_round(strategy, ArrayRecord(GLOBAL))
    with pytest.raises(StageError, match="nan_stage returned a model with NaN or Inf"):
        strategy.aggregate_train(1, [train_reply(node=1, state={"w": torch.ones(3), "b": torch.ones(2)})])
    assert strategy.report.train == {}  # nothing of the round was recorded as if it had worked


def pretrain_nan(arrays: ArrayRecord) -> Outcome:
    return nan_stage(0, arrays, MetricRecord())


def test_an_initial_stage_returning_nan_weights_stops_before_round_one():
    grid = FailingGrid(2)
    strategy = ServerStages(build_strategy(validated()), Stages(before_training=[pretrain_nan]), RecordingReport())
    with pytest.raises(StageError, match="pretrain_nan"):
        strategy.start(grid, ArrayRecord(GLOBAL), num_rounds=1)
    assert grid.pushed == 0


def test_a_non_finite_aggregate_keeps_the_global_model(monkeypatch):
    """Finite updates can still average to Inf in a strategy's own arithmetic (server momentum, say)."""
    policy = served(build_strategy(validated())).inner
    begin_round(policy, ArrayRecord(GLOBAL))
    monkeypatch.setattr(
        policy.inner, "aggregate_train", lambda r, replies: (nan_stage(r, ArrayRecord(GLOBAL), None).arrays, None)
    )
    arrays, metrics = policy.aggregate_train(1, [train_reply(node=1, state={"w": torch.ones(3), "b": torch.ones(2)})])
    assert arrays is None and metrics["replies"] == 1 and policy.updated_rounds == 0


class FailingGrid(InProcessGrid):
    """Every node answers its partition id, and every train message with an error (as on a timeout)."""

    def __init__(self, clients: int) -> None:
        super().__init__()
        self.clients = clients

    def get_node_ids(self):
        return list(range(self.clients))

    def answer(self, msg: Message) -> Message:
        if msg.metadata.message_type == "query":
            pid = msg.metadata.dst_node_id
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)
        return Message(Error(code=1, reason="timed out"), reply_to=msg)


def test_a_run_shorter_than_max_empty_rounds_that_aggregated_nothing_fails(tmp_path):
    cfg = validated({**TINY, "output-dir": str(tmp_path), "max-empty-rounds": 3})
    with pytest.raises(RuntimeError, match="no round of this run aggregated a single client update.*timed out"):
        server_app.run(FailingGrid(4), cfg, "empty")


def test_one_good_round_is_enough_to_finish():
    policy = served(build_strategy(validated(num_clients=2, fraction_train=1.0))).inner
    begin_round(policy, ArrayRecord(GLOBAL), nodes=2)
    policy.aggregate_train(1, [])  # every reply timed out
    with pytest.raises(RuntimeError, match="no round.*2 of 2 sampled clients sent no reply within round-timeout"):
        policy.require_an_update()
    policy.aggregate_train(2, [train_reply(node=1, state={"w": torch.ones(3), "b": torch.ones(2)})])
    policy.require_an_update()


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        ({"output-dir": ""}, "'output-dir' is empty"),
        ({"output-dir": "  "}, "'output-dir' is empty"),
        ({"pretrain": True, "pretrain-cache-dir": ""}, "'pretrain-cache-dir' is empty"),
    ],
)
def test_empty_output_folders_are_refused(overrides, hint):
    with pytest.raises(ConfigError, match=hint):
        validated(overrides)


def test_output_dir_naming_a_file_is_refused(tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(ConfigError, match="'output-dir' = .* is an existing file"):
        validated({"output-dir": str(file)})


class NegativeVarianceGrid(FailingGrid):
    """Every node sends back the model it got with its BatchNorm running variances at -1: finite weights
    (the reply screening accepts them) whose logits are NaN, as Flower's FedAvgM made them."""

    def answer(self, msg: Message) -> Message:
        if msg.metadata.message_type == "query":
            return super().answer(msg)
        state = msg.content["arrays"].to_torch_state_dict()
        broken = {k: torch.full_like(v, -1.0) if k.endswith("running_var") else v for k, v in state.items()}
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0})
        return Message(RecordDict({"arrays": ArrayRecord(broken), "metrics": metrics}), reply_to=msg)


def test_a_model_with_nan_logits_stops_the_run_naming_round_and_step_and_is_never_scored(tmp_path):
    """argmax of an all-NaN row is 0: without the check, this model was scored as if it predicted class 0."""
    cfg = validated({**TINY, "output-dir": str(tmp_path)})
    with pytest.raises(
        BrokenModel, match=r"round 1: the global model made by aggregation by fedavg .*NaN or Inf logits"
    ):
        server_app.run(NegativeVarianceGrid(4), cfg, "nan")
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0]  # the initial model's line only
    assert not (tmp_path / "nan" / checkpoint.CHECKPOINT).exists()


def test_predict_refuses_nan_logits_instead_of_predicting_class_0():
    model = torch.nn.Linear(3, 4)
    torch.nn.init.constant_(model.bias, float("nan"))
    batches = SimpleNamespace(iterate=lambda: iter([(torch.ones(5, 3), torch.zeros(5, dtype=torch.long))]))
    with pytest.raises(NonFiniteLogits, match="NaN or Inf logits for 5 of 5 images"):
        predict(model, batches)


def evaluate_after_round_0(server_round: int, arrays: ArrayRecord) -> None:
    """Stands in for the server's evaluation meeting a model whose logits are NaN, from round 1 on."""
    if server_round:
        raise NonFiniteModel(arrays, "it gives NaN or Inf logits for 1 of 1 images")


def shift_stage(server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> Outcome:
    return Outcome(ArrayRecord({k: v + 1 for k, v in arrays.to_torch_state_dict().items()}))


def scoring_stage(server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> Outcome:
    """Evaluates the model it is given first, as alignment does."""
    evaluate_after_round_0(server_round, arrays)
    return Outcome(arrays)


class EchoGrid(FailingGrid):
    """Every node sends back the model it got."""

    def answer(self, msg: Message) -> Message:
        if msg.metadata.message_type == "query":
            return super().answer(msg)
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)


@pytest.mark.parametrize(
    ("stages", "offset", "grid", "made_by"),
    [
        ([], 0, EchoGrid, "round 1: the global model made by aggregation by fedavgm"),
        ([shift_stage], 0, EchoGrid, "round 1: the global model made by stage shift_stage"),
        ([scoring_stage], 0, EchoGrid, "round 1: the global model made by aggregation by fedavgm"),
        ([shift_stage], 4, FailingGrid, r"round 5: the global model made by the resumed checkpoint \(round 4\)"),
    ],
    ids=["aggregation", "stage", "stage-input", "resumed"],
)
def test_a_broken_model_stops_the_run_naming_the_step_that_made_it(stages, offset, grid, made_by):
    strategy = ServerStages(
        RoundPolicy(build_strategy(validated({"strategy": "fedavgm", "num-clients": 4}))),
        Stages(after_aggregation=stages),
        RecordingReport(),
        round_offset=offset,
        method="fedavgm",
    )
    with pytest.raises(BrokenModel, match=made_by):
        strategy.start(grid(4), ArrayRecord(GLOBAL), num_rounds=1, evaluate_fn=evaluate_after_round_0)

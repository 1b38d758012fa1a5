"""No run reports a success it did not earn: NaN models are never adopted, a run that aggregated nothing
fails, and reports never land in the working directory."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from alignment.stage import check_inputs
from flcore.config import ConfigError, validate
from flcore.run_data import prepare
from rounds.stage import Outcome, Stages
from server_app import app as server_app
from server_app import launch
from strategies.registry import STRATEGIES, build_strategy
from strategies.wrapper import ServerStages, StageError
from tests.conftest import InProcessGrid, RecordingReport, served

pytestmark = pytest.mark.usefixtures("flower_identity")

GLOBAL = {"w": torch.zeros(3), "b": torch.zeros(2)}
TINY = {"num-server-rounds": 2, "local-epochs": 1, "num-clients": 4, "fraction-train": 0.5, "image-size": 8}


def check(overrides: dict) -> dict:
    return validate(overrides, choices={"strategy": STRATEGIES})


def reply(node: int, state: dict, n: int = 1) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=request)


def nan_stage(server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> Outcome:
    return Outcome(ArrayRecord({k: torch.full(tuple(a.shape), float("nan")) for k, a in arrays.items()}))


def test_nan_logits_file_is_refused_naming_the_key(tmp_path, no_superlink, capsys):
    cfg = check({**TINY, "align": True, "output-dir": str(tmp_path)})
    prep = prepare(cfg)
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full((len(prep.split.align), prep.dataset.num_classes), np.nan, np.float32))
    with pytest.raises(ConfigError, match="'align-logits-file'.*NaN or Inf"):
        check_inputs({**cfg, "align-logits-file": str(bad)}, prep.dataset, prep.split.align)
    words = " ".join(f"{k}={v}" for k, v in TINY.items())
    assert launch.main(["--run-config", f"{words} align=true align-logits-file={bad}"]) == 2
    assert "NaN or Inf" in capsys.readouterr().err


def test_a_stage_returning_nan_weights_stops_the_run_naming_the_stage():
    strategy = served(build_strategy(check({})), after_aggregation=[nan_stage])
    strategy.inner._global = ArrayRecord(GLOBAL)
    with pytest.raises(StageError, match="nan_stage returned a model with NaN or Inf"):
        strategy.aggregate_train(1, [reply(1, {"w": torch.ones(3), "b": torch.ones(2)})])
    assert strategy.report.train == {}  # nothing of the round was recorded as if it had worked


def pretrain_nan(arrays: ArrayRecord) -> Outcome:
    return nan_stage(0, arrays, MetricRecord())


def test_an_initial_stage_returning_nan_weights_stops_before_round_one():
    grid = FailingGrid(2)
    strategy = ServerStages(build_strategy(check({})), Stages(before_training=[pretrain_nan]), RecordingReport())
    with pytest.raises(StageError, match="pretrain_nan"):
        strategy.start(grid, ArrayRecord(GLOBAL), num_rounds=1)
    assert grid.pushed == 0


def test_a_non_finite_aggregate_keeps_the_global_model(monkeypatch):
    """Finite updates can still average to Inf in a strategy's own arithmetic (server momentum, say)."""
    policy = served(build_strategy(check({}))).inner
    policy._global = ArrayRecord(GLOBAL)
    monkeypatch.setattr(
        policy.inner, "aggregate_train", lambda r, replies: (nan_stage(r, policy._global, None).arrays, None)
    )
    arrays, metrics = policy.aggregate_train(1, [reply(1, {"w": torch.ones(3), "b": torch.ones(2)})])
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
    cfg = check({**TINY, "output-dir": str(tmp_path), "max-empty-rounds": 3})
    with pytest.raises(RuntimeError, match="no round of this run aggregated a single client update.*timed out"):
        server_app.run(FailingGrid(4), cfg, "empty")


def test_one_good_round_is_enough_to_finish():
    strategy = served(build_strategy(check({})))
    policy = strategy.inner
    policy._global, policy._sent = ArrayRecord(GLOBAL), 2
    policy.aggregate_train(1, [])  # every reply timed out
    with pytest.raises(RuntimeError, match="no round.*2 of 2 sampled clients sent no reply within round-timeout"):
        policy.require_an_update()
    policy.aggregate_train(2, [reply(1, {"w": torch.ones(3), "b": torch.ones(2)})])
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
        check(overrides)


def test_output_dir_naming_a_file_is_refused(tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(ConfigError, match="'output-dir' = .* is an existing file"):
        check({"output-dir": str(file)})

"""Fault tolerance: failed, non-finite and malformed client replies never reach the average, runs go on."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict

from flcore.config import ConfigError
from rounds.guard import screen
from rounds.policy import RoundPolicy
from strategies.registry import build_strategy
from tests.helpers import GLOBAL, FlakyGrid, begin_round, served, train_reply, validated

pytestmark = pytest.mark.usefixtures("flower_identity")


def request(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")


def reply(node: int, state: dict, n: int = 1, **metrics) -> Message:
    return train_reply(state, n, node=node, metrics={"loss": 1.0, **metrics})


def error_reply(node: int) -> Message:
    return Message(Error(code=1, reason="client crashed"), reply_to=request(node))


def fedavg(clients: int = 20, **policy) -> RoundPolicy:
    """FedAvg on `clients` nodes, every one sampled, behind the round policy; round 1's messages sent."""
    guarded = RoundPolicy(build_strategy(validated(num_clients=clients, fraction_train=1.0)), **policy)
    begin_round(guarded, ArrayRecord(GLOBAL), clients)
    return guarded


def test_nan_update_is_rejected_and_round_equals_aggregation_without_it():
    good = [
        reply(1, {"w": torch.ones(3), "b": torch.ones(2)}, 2),
        reply(2, {"w": torch.ones(3) * 4, "b": torch.ones(2)}),
    ]
    nan = reply(3, {"w": torch.tensor([1.0, float("nan"), 0.0]), "b": torch.ones(2)}, 5)
    guarded = fedavg(3)
    arrays, metrics = guarded.aggregate_train(1, [good[0], nan, good[1]])
    expected, _ = build_strategy(validated()).aggregate_train(1, good)
    for key in ("w", "b"):
        assert np.array_equal(arrays[key].numpy(), expected[key].numpy())
    assert np.allclose(arrays["w"].numpy(), [2.0, 2.0, 2.0])  # (1*2 + 4*1) / 3
    assert (metrics["replies"], metrics["rejected"], metrics["failed"]) == (2, 1, 0)


@pytest.mark.parametrize(
    ("state", "metrics", "reason"),
    [
        ({"w": torch.ones(4), "b": torch.ones(2)}, {}, "shape"),
        ({"w": torch.ones(3)}, {}, "missing ['b']"),
        ({"w": torch.ones(3), "b": torch.ones(2), "extra": torch.ones(1)}, {}, "unexpected ['extra']"),
        ({"w": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}, {}, "NaN or Inf"),
        ({"w": torch.ones(3), "b": torch.ones(2)}, {"loss": float("nan")}, "metrics ['loss']"),
        ({"w": torch.ones(3), "b": torch.ones(2)}, {"num-examples": 0}, "num-examples"),
        ({"w": torch.ones(3), "b": torch.ones(2)}, {"surprise": 1.0}, "metric keys"),
    ],
)
def test_malformed_updates_are_rejected_with_a_reason(state, metrics, reason):
    fine = reply(1, {"w": torch.ones(3), "b": torch.ones(2)})
    other = reply(2, {"w": torch.ones(3), "b": torch.ones(2)})
    bad = reply(9, state, **metrics)
    checked = screen([fine, bad, other], ArrayRecord(GLOBAL))
    assert len(checked.accepted) == 2 and bad not in checked.accepted
    ((node, why),) = checked.rejected
    assert node == 9 and reason in why


def test_error_replies_and_missing_replies_count_as_failed():
    guarded = fedavg(4)
    arrays, metrics = guarded.aggregate_train(1, [reply(1, {"w": torch.ones(3), "b": torch.ones(2)}), error_reply(2)])
    assert np.allclose(arrays["w"].numpy(), 1.0)
    assert (metrics["replies"], metrics["rejected"], metrics["failed"]) == (1, 0, 3)  # 1 error + 2 never replied


def test_round_below_min_replies_keeps_the_global_model():
    guarded = fedavg(2, min_replies=2)
    arrays, metrics = guarded.aggregate_train(1, [reply(1, {"w": torch.ones(3), "b": torch.ones(2)}), error_reply(2)])
    assert arrays is None and metrics["replies"] == 1 and metrics["failed"] == 1


def test_run_with_30_percent_failed_replies_completes_every_round():
    cfg = validated({"num-clients": 10, "fraction-train": 1.0, "min-replies": 3})
    grid = FlakyGrid({1000 + 7 * i: i for i in range(10)}, seed=3, rate=0.3)
    strategy = served(build_strategy(cfg), min_replies=3, seed=3)
    result = strategy.start(grid, ArrayRecord(GLOBAL), num_rounds=10)
    rows = strategy.report.train
    assert sorted(rows) == list(range(1, 11))
    assert sum(r["failed"] for r in rows.values()) == grid.failed
    assert 0.15 < grid.failed / grid.sent < 0.45  # about 30 % of the 100 replies failed
    assert all(r["replies"] + r["failed"] == 10 for r in rows.values())
    assert np.isfinite(result.arrays["w"].numpy()).all() and result.arrays["w"].numpy()[0] > 10
    print(f"fault test: {len(rows)}/10 rounds completed, {grid.failed} of {grid.sent} client replies lost")


def test_min_replies_above_the_sampled_clients_is_refused():
    with pytest.raises(ConfigError, match="min-replies"):
        validated({"num-clients": 10, "fraction-train": 0.2, "min-replies": 3})


class DroppingGrid(FlakyGrid):
    """Node of partition 0 leaves for good after round 1; polling for it more than a few times fails the test."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.polls = 0

    def get_node_ids(self):
        self.polls += 1
        if self.polls > 5:
            raise RuntimeError("the strategy is waiting for a node that is gone")
        return [n for n, pid in self.nodes.items() if pid != 0 or self.sent == 0]

    def push_messages(self, messages):
        self.polls = 0
        return super().push_messages(messages)


def test_a_node_lost_for_good_does_not_block_later_rounds():
    cfg = validated({"num-clients": 4, "fraction-train": 1.0})
    grid = DroppingGrid({10 + i: i for i in range(4)}, seed=3, rate=0.0)
    strategy = served(build_strategy(cfg), seed=3)
    strategy.start(grid, ArrayRecord(GLOBAL), num_rounds=3)
    assert [strategy.report.train[r]["replies"] for r in (1, 2, 3)] == [4, 3, 3]


def test_rounds_without_any_valid_update_stop_the_run_after_max_empty_rounds():
    """Every client failing (say, refusing the server's message) must not end as a 'finished' run."""
    grid = FlakyGrid({1000 + i: i for i in range(4)}, seed=0, rate=1.0)
    cfg = validated({"num-clients": 4, "fraction-train": 1.0})
    strategy = served(build_strategy(cfg), max_empty_rounds=2)
    with pytest.raises(RuntimeError, match="2 rounds in a row without one valid client update.*injected"):
        strategy.start(grid, ArrayRecord(GLOBAL), num_rounds=5)
    assert grid.sent == 8  # stopped after round 2 of 5


def test_an_empty_round_between_good_ones_does_not_stop_the_run():
    guarded = fedavg(1, max_empty_rounds=2)
    good = reply(1, {"w": torch.ones(3), "b": torch.ones(2)})
    for rnd, replies in enumerate(([error_reply(1)], [good], [error_reply(1)], [good], [error_reply(1)]), 1):
        guarded.aggregate_train(rnd, replies)  # never two empty rounds in a row
    with pytest.raises(RuntimeError, match="2 rounds in a row without one valid client update"):
        guarded.aggregate_train(6, [error_reply(1)])  # the second in a row


def test_rounds_of_diverged_clients_stop_the_run_saying_what_to_lower():
    """Every reply NaN (a loss weight too large for the learning rate, say): the error names the settings."""
    guarded = fedavg(1, max_empty_rounds=2)
    nan = reply(1, {"w": torch.ones(3), "b": torch.ones(2)}, **{"train-loss": float("nan")})
    guarded.aggregate_train(1, [nan])
    with pytest.raises(RuntimeError, match=r"train-loss.*NaN or Inf \(the clients' training diverged: lower `lr`"):
        guarded.aggregate_train(2, [nan])

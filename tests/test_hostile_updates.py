"""One party cannot steer the model with finite numbers either: an update far larger than the round's
others is clipped to a bound relative to the median, under every strategy."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from flcore.config import validate
from rounds.delegate import Delegating
from rounds.norms import bound_updates
from rounds.policy import RoundPolicy
from strategies.registry import STRATEGIES, build_server_strategy
from tests.helpers import RecordingReport
from tests.test_untrusted import GLOBAL, arrays_of, good, reply

pytestmark = pytest.mark.usefixtures("flower_identity")


def seven_honest_and_one_at_1e30():
    return [good(i, 1.0) for i in range(1, 8)] + [good(9, 1e30)]


def test_one_client_of_8_sending_1e30_no_longer_moves_fedavg_there():
    """Before: FedAvg adopted (7 x 1 + 1e30) / 8 = 1.25e29. Now the update is clipped to 10 x the median
    norm (the default max-update-ratio), in the direction it was sent: (7 x 1 + 10) / 8."""
    cfg = validate({}, choices={"strategy": STRATEGIES})
    policy = build_server_strategy(cfg, None, RecordingReport()).policy
    policy._global = ArrayRecord(arrays_of(GLOBAL))
    arrays, metrics = policy.aggregate_train(1, seven_honest_and_one_at_1e30())
    assert np.allclose(arrays["w"].numpy(), 17 / 8) and np.allclose(arrays["b"].numpy(), 17 / 8)
    assert metrics["clipped"] == 1 and metrics["replies"] == 8


class Recording(Delegating):
    """A stand-in strategy that keeps the replies it is handed."""

    def __init__(self):
        self.seen = []

    def aggregate_train(self, server_round, replies):
        self.seen = [r.content["arrays"]["w"].numpy().copy() for r in replies]
        return None, MetricRecord()


def test_the_bound_holds_before_any_strategy_sees_the_replies():
    inner = Recording()
    policy = RoundPolicy(inner, max_update_ratio=2.0)
    policy._global = ArrayRecord(arrays_of(GLOBAL))
    policy.aggregate_train(1, [good(1, 1.0), good(2, 3.0), good(3, -100.0)])
    assert [w.tolist() for w in inner.seen] == [[1.0] * 3, [3.0] * 3, [-6.0] * 3]  # bound: 2 x the median, 3


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedmedian", "fedtrimmedavg"])
def test_no_flower_strategy_adopts_a_1e30_update(name):
    cfg = validate({"strategy": name, "trim-fraction": 0.1}, choices={"strategy": STRATEGIES})
    policy = build_server_strategy(cfg, None, RecordingReport()).policy
    policy._global = ArrayRecord(arrays_of(GLOBAL))
    arrays, _ = policy.aggregate_train(1, seven_honest_and_one_at_1e30())
    assert np.all(np.abs(arrays["w"].numpy()) <= 17 / 8 + 1e-6)


def test_a_float64_update_of_1e308_is_clipped_without_overflow():
    """Its norm, sqrt(5) x 1e308, is beyond float64; the clipped update is computed from the unit direction."""
    base = {"w": np.zeros(3), "b": np.zeros(2)}
    replies = [reply(i, {"w": np.full(3, 1.0), "b": np.full(2, 1.0)}) for i in (1, 2)]
    replies.append(reply(9, {"w": np.array([1e308, -1e308, 1e308]), "b": np.full(2, 1e308)}))
    ((node, norm, bound),) = bound_updates(replies, ArrayRecord(arrays_of(base)), 10.0)
    assert node == 9 and math.isinf(norm) and bound == pytest.approx(10 * math.sqrt(5))
    clipped = replies[2].content["arrays"]
    assert np.allclose(clipped["w"].numpy(), [10, -10, 10]) and clipped["w"].numpy().dtype == np.float64


def test_integer_buffers_are_left_out_of_the_norm_and_left_as_sent():
    base = ArrayRecord(arrays_of({"w": np.zeros(3, np.float32), "steps": np.array(0, np.int64)}))
    many_steps = reply(1, {"w": np.full(3, 1.0, np.float32), "steps": Array(np.array(500, np.int64))})
    few_steps = reply(2, {"w": np.full(3, 1.0, np.float32), "steps": Array(np.array(5, np.int64))})
    assert bound_updates([many_steps, few_steps], base, 1.0) == []
    assert int(many_steps.content["arrays"]["steps"].numpy()) == 500


def test_max_update_ratio_is_a_checked_key():
    from flcore.config import ConfigError

    assert validate({}, choices={"strategy": STRATEGIES})["max-update-ratio"] == 10.0
    with pytest.raises(ConfigError, match="'max-update-ratio' = 0.5"):
        validate({"max-update-ratio": 0.5}, choices={"strategy": STRATEGIES})


# --- item 15: what a self-reported num-examples can buy -------------------------------------------------


def liar_share(weighting: str, honest: int) -> float:
    """The liar's share of the average: `honest` nodes with 100 examples send w = 0, one node claims as many
    examples as the caps allow (`max-examples`) and sends w = 1; nothing is known of any node's size. All
    move b by 1, so the liar's update is not clipped as far larger than the others'."""
    cfg = validate({"client-data": "local", "weighting": weighting}, choices={"strategy": STRATEGIES})
    policy = build_server_strategy(cfg, None, RecordingReport()).policy
    policy._global = ArrayRecord(arrays_of(GLOBAL))
    b = np.ones(2, np.float32)
    replies = [reply(i, {"w": np.zeros(3, np.float32), "b": b}, n=100) for i in range(1, honest + 1)]
    replies.append(reply(99, {"w": np.ones(3, np.float32), "b": b}, n=cfg["max-examples"]))
    arrays, _ = policy.aggregate_train(1, replies)
    return float(arrays["w"].numpy()[0])


@pytest.mark.parametrize(
    ("weighting", "honest", "share"),
    [
        ("examples", 1, 10 / 11),  # the documented bound r / (r + k), r = max-weight-ratio = 10
        ("examples", 7, 10 / 17),
        ("capped-median", 1, 1 / 2),
        ("capped-median", 7, 1 / 8),
        ("uniform", 1, 1 / 2),
        ("uniform", 7, 1 / 8),
    ],
)
def test_a_node_claiming_the_most_examples_takes_the_documented_share(weighting, honest, share):
    assert liar_share(weighting, honest) == pytest.approx(share, rel=1e-5)


def test_uniform_weighting_ignores_claims_below_the_median_too():
    cfg = validate({"weighting": "uniform"}, choices={"strategy": STRATEGIES})
    policy = build_server_strategy(cfg, None, RecordingReport()).policy
    policy._global = ArrayRecord(arrays_of(GLOBAL))
    arrays, _ = policy.aggregate_train(1, [good(1, 1.0, n=1000), good(2, 1.0, n=1000), good(3, 4.0, n=1)])
    assert np.allclose(arrays["w"].numpy(), 2.0)


def test_the_weighting_choices_are_the_registry():
    from flcore.config import SCHEMA
    from rounds.weights import WEIGHTINGS

    assert SCHEMA["weighting"].choices == tuple(WEIGHTINGS)

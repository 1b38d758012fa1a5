"""Parity: the project's FedAvgM server step against FL-bench's `src/server/fedavgm.py` (fixture's "source").

The fixture holds FL-bench's global model after each of three rounds, computed by its own
`FedAvgMServer.aggregate_client_updates` (recipe in the fixture); the project's strategy, built from the
default config, must reach the same weights from the same client weights and sample counts.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies.registry import build_strategy
from tests.helpers import validated

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "fedavgm.json").read_text())

pytestmark = pytest.mark.usefixtures("flower_identity")


class NoGrid:
    """configure_train only needs the node IDs to sample from."""

    def get_node_ids(self):
        return [1, 2, 3]


def reply(state: dict, n: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="train")
    metrics = MetricRecord({"num-examples": n, "train-loss": 1.0})
    arrays = ArrayRecord({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=request)


def test_default_fedavgm_follows_fl_bench_server_update_over_three_rounds():
    cfg = validated({"strategy": "fedavgm", "num-clients": 3, "fraction-train": 1.0})
    assert (cfg["server-lr"], cfg["server-momentum"], cfg["server-nesterov"]) == (
        FIXTURE["server-lr"],
        FIXTURE["server-momentum"],
        FIXTURE["nesterov"],
    )
    strategy = build_strategy(cfg)
    arrays = ArrayRecord({k: torch.tensor(v, dtype=torch.float32) for k, v in FIXTURE["initial"].items()})
    plain_average_differs = False
    for server_round, (clients, weights, expected) in enumerate(
        zip(FIXTURE["clients"], FIXTURE["weights"], FIXTURE["expected"], strict=True), start=1
    ):
        strategy.configure_train(server_round, arrays, ConfigRecord(), NoGrid())
        arrays, _ = strategy.aggregate_train(server_round, [reply(c, n) for c, n in zip(clients, weights, strict=True)])
        for key, value in expected.items():
            np.testing.assert_allclose(arrays[key].numpy(), np.asarray(value, dtype=np.float32), rtol=0, atol=1e-6)
            average = sum(n * np.asarray(c[key]) for c, n in zip(clients, weights, strict=True)) / sum(weights)
            plain_average_differs |= not np.allclose(average, value, atol=1e-3)
    assert plain_average_differs  # the fixture exercises the momentum, not just FedAvg

"""Many virtual clients: what the server sends and what a client builds grow with the clients sampled."""

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from PIL import Image

import flcore.run_data as run_data
from client_app.app import app as client_app
from flcore.datasets import ImageSet
from flcore.models import run_model
from flcore.reports import RunReport
from flcore.seeding import seeded_random
from tests.helpers import InProcessGrid, served, validated

pytestmark = pytest.mark.usefixtures("flower_identity")

NODES, SAMPLED, SEED = 1000, 10, 7
GLOBAL = {"w": torch.zeros(3)}


class CountingGrid(InProcessGrid):
    """`NODES` nodes with random IDs, each holding partition i of the split; records every message it gets."""

    def __init__(self) -> None:
        super().__init__()
        ids = random.Random(1).sample(range(1, 2**40), NODES)
        self.own = {node: i for i, node in enumerate(ids)}
        self.log: list[tuple[str, int]] = []  # (message type, partition the message is for)

    def get_node_ids(self):
        return list(self.own)

    def answer(self, msg: Message) -> Message:
        own = self.own[msg.metadata.dst_node_id]
        if msg.metadata.message_type == "query":
            self.log.append(("query", own))
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": own})}), reply_to=msg)
        pid = int(msg.content["config"].get("partition-id", own))
        self.log.append((msg.metadata.message_type, pid))
        state = {"w": torch.full((3,), float(pid))}
        return Message(
            RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg
        )


def run_two_rounds(partitions: int | None) -> CountingGrid:
    grid = CountingGrid()
    inner = FedAvg(fraction_train=SAMPLED / NODES, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=NODES)
    served(inner, seed=SEED, partitions=partitions).start(grid, ArrayRecord(GLOBAL), num_rounds=2)
    return grid


def seeded_picks(server_round: int) -> list[int]:
    with seeded_random(SEED, server_round):
        return sorted(random.sample(range(NODES), SAMPLED))


def test_with_1000_nodes_a_round_sends_only_its_10_sampled_messages_and_picks_the_seeded_partitions():
    """partition-assignment=server: no node is asked anything, before round 1 or later; each round's messages are
    its sampled clients', naming the partitions the seed picks (the rule asking every node follows)."""
    given = run_two_rounds(partitions=NODES)
    assert [kind for kind, _ in given.log] == ["train"] * (2 * SAMPLED)
    assert sorted(pid for _, pid in given.log[:SAMPLED]) == seeded_picks(1)
    assert sorted(pid for _, pid in given.log[SAMPLED:]) == seeded_picks(2)
    asked = run_two_rounds(partitions=None)  # partition-assignment=node: one query per node before round 1
    assert [kind for kind, _ in asked.log].count("query") == NODES
    assert [entry for entry in asked.log if entry[0] == "train"] == given.log


def test_a_new_node_takes_the_lowest_free_partition_and_keeps_it():
    from rounds.sampling import NodeOrder

    order = NodeOrder(partitions=3)
    order.learn(None, [30, 10])
    order.learn(None, [20, 10, 40])
    assert order.partition == {10: 0, 30: 1, 20: 2, 40: None}


def client_cfg(tmp_path, assignment: str) -> dict:
    return validated(
        {
            "num-clients": NODES,
            "fraction-train": 0.01,
            "imbalance-factor": 1.0,
            "dirichlet-alpha": 100.0,
            "min-partition-size": 1,
            "image-size": 8,
            "projection-dim": 16,
            "local-epochs": 1,
            "partition-assignment": assignment,
            "output-dir": str(tmp_path),
        },
    )


def train_message(cfg: dict, partition: int) -> Message:
    model = run_model(cfg, 10, seed=0)
    config = ConfigRecord({"server-round": 1, "partition-id": partition})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, dst_node_id=5, message_type="train")


def node_context(cfg: dict, own: int) -> Context:
    return Context(1, 5, {"partition-id": own, "num-partitions": NODES}, RecordDict(), dict(cfg))


def test_a_client_trains_the_partition_named_and_builds_data_for_the_partitions_it_serves_only(
    tmp_path, monkeypatch, one_thread
):
    cfg = client_cfg(tmp_path, "server")
    built = []
    real = run_data._client_batches

    def recording(key, batch_size, partition_id, compute):
        built.append(partition_id)
        return real(key, batch_size, partition_id, compute)

    monkeypatch.setattr(run_data, "_client_batches", recording)
    real.cache_clear()
    split = run_data.prepare(cfg).split
    for partition in (3, 998, 3):
        reply = client_app(train_message(cfg, partition), node_context(cfg, own=0))
        assert reply.content["metrics"]["num-examples"] == len(split.clients[partition])
    assert sorted(set(built)) == [3, 998] and real.cache_info().currsize == 2  # nothing for the other 998 partitions


def test_with_partition_assignment_node_a_client_refuses_another_partition(tmp_path, one_thread):
    cfg = client_cfg(tmp_path, "node")
    with pytest.raises(ValueError, match="serves partition 0.*partition-assignment=node"):
        client_app(train_message(cfg, 3), node_context(cfg, own=0))
    reply = client_app(train_message(cfg, 0), node_context(cfg, own=0))
    assert reply.content["metrics"]["num-examples"] == len(run_data.prepare(cfg).split.clients[0])


def test_the_partition_figure_of_1000_clients_stays_a_few_inches_high(tmp_path):
    report = RunReport(tmp_path, 1, [f"c{i}" for i in range(10)])
    histogram = np.random.default_rng(0).integers(0, 9, (NODES, 10))
    report.write_partition(histogram, histogram.sum(axis=0), {"many": [], "medium": [], "few": []})
    with Image.open(tmp_path / "partition.png") as png:
        assert png.size[1] <= 14 * 110  # one 0.3-inch row per client was 301.5 inches, 33,165 pixels


def test_bench_scale_dataset_gives_every_client_its_images_and_the_table_compares_sizes(tmp_path):
    from bench import scale
    from flcore.run_config import parse_overrides

    scale.write_dataset(tmp_path, max_clients=40)
    for clients in (20, 40):  # every client holds as many images in the smaller run as in the larger
        settings = {**parse_overrides([scale.SETTINGS]), "data-dir": str(tmp_path), "num-clients": clients}
        settings["align-per-class"] = scale.align_per_class(clients, max_clients=40)
        split = run_data.prepare(validated(settings)).split
        assert [len(c) for c in split.clients] == [scale.IMAGES_PER_CLIENT] * clients
    runs = [{"clients": 100, "actors": 2, **dict.fromkeys(scale.FIGURES, v)} for v in (2.0, 1.0)]
    small = scale.best(runs)
    assert (small["round s"], small["tree peak MB"]) == (1.0, 2.0)  # least disturbed time, highest peak
    large = {**small, "clients": 1000, "round s": 1.2}
    assert "| round s | 1.0 | 1.2 | 1.20 |" in scale.table([small, large])


def test_a_client_process_keeps_teacher_logits_of_its_last_64_partitions_only(tmp_path, monkeypatch):
    """CLIP2FL's clients cache the teacher's logits per partition; an actor serving 1,000 clients keeps 64."""
    from client_app import distill

    computed = []

    def stub(cfg, partition_id, classes, images):
        computed.append(partition_id)
        return torch.full((2, 10), float(partition_id))

    monkeypatch.setattr(distill, "_CACHE", {})
    monkeypatch.setattr(distill, "_clip_logits", stub)
    cfg = client_cfg(tmp_path, "server")
    for pid in [*range(distill.CACHED_PARTITIONS), 0, distill.CACHED_PARTITIONS, 0, 1]:
        assert distill.teacher_logits(cfg, pid, (), ImageSet.empty())[0, 0] == pid
    assert len(distill._CACHE) == distill.CACHED_PARTITIONS
    assert computed == [*range(distill.CACHED_PARTITIONS), distill.CACHED_PARTITIONS, 1]  # 0 was used again, 1 was not

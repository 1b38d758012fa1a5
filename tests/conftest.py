"""Test settings: never reach a model or dataset hub; keep torch to the two cores quietly."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any test imports a hub library; pytest itself does not
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def teacher_calls(monkeypatch):
    """Counts CLIP zero-shot forwards (one entry per call: its image count) without changing their results."""
    from alignment import teacher as clip_teacher

    calls = []
    real = clip_teacher.zero_shot_logits

    def counting(teacher, classes, images, *args, **kwargs):
        calls.append(len(images))
        return real(teacher, classes, images, *args, **kwargs)

    monkeypatch.setattr(clip_teacher, "zero_shot_logits", counting)
    return calls


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids contention (8x faster here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_superlink(monkeypatch):
    """The launcher must stop on bad input before it starts any Flower process."""
    from server_app import launch

    def forbidden(*args, **kwargs):
        raise AssertionError("the SuperLink must not start on bad input")

    monkeypatch.setattr(launch, "start_superlink", forbidden)


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages built outside a Flower runtime need the process's run/node identity, as the runtime sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class InProcessGrid:
    """A Grid whose nodes answer in this process: `push_messages` calls `answer` on each message at once.

    Message ids are assigned on push, as Flower's own InMemoryGrid does, so the server's reply
    bookkeeping (`PromptGrid`) runs unchanged. Subclasses define `get_node_ids` and `answer`.
    """

    def __init__(self):
        self.pushed, self.outbox = 0, []

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.pushed}"
            self.outbox.append(self.answer(msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        ready = [r for r in self.outbox if r.metadata.reply_to_message_id in wanted]
        self.outbox = [r for r in self.outbox if r.metadata.reply_to_message_id not in wanted]
        return ready


class ClientAppGrid(InProcessGrid):
    """Nodes 0..num-clients-1 run the real ClientApp, routed by message type as Flower routes it.

    `configs` records every train config sent, `requests` every message other than the partition query.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.configs, self.requests = cfg, [], []

    def get_node_ids(self):
        return list(range(int(self.cfg["num-clients"])))

    def answer(self, msg):
        from flwr.app import Context, RecordDict

        from client_app.app import app

        node = msg.metadata.dst_node_id
        context = Context(
            1, node, {"partition-id": node, "num-partitions": self.cfg["num-clients"]}, RecordDict(), dict(self.cfg)
        )
        if msg.metadata.message_type != "query":
            self.requests.append(msg)
        if msg.metadata.message_type == "train":
            self.configs.append(dict(msg.content["config"]))
        return app(msg, context)


class RecordingReport:
    """Stands in for `RunReport` where a test drives the strategy wrapper: keeps what it is handed."""

    def __init__(self):
        self.train, self.outcomes, self.nodes = {}, [], {}

    def record_train(self, server_round, metrics):
        self.train[server_round] = dict(metrics)

    def record_nodes(self, server_round, nodes):
        self.nodes[server_round] = dict(nodes)

    def take(self, outcome):
        self.outcomes.append(outcome)


def served(strategy, after_aggregation=(), report=None, **policy):
    """The ServerApp's stack around `strategy`: the round policy (with `policy` options), then the stages."""
    from rounds.policy import RoundPolicy
    from rounds.stage import Stages
    from strategies.wrapper import ServerStages

    stages = Stages(after_aggregation=list(after_aggregation))
    return ServerStages(RoundPolicy(strategy, **policy), stages, report or RecordingReport())

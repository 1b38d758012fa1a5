"""Test settings: never reach a model or dataset hub; keep torch to the two cores quietly."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages built outside a Flower runtime need the process's run/node identity, as the runtime sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class InProcessGrid:
    """A Grid that hands each pushed message to a ClientApp function in this process.

    Message ids are assigned on push, as Flower's own InMemoryGrid does, so the server's reply
    bookkeeping (`PromptGrid`) works unchanged. `configs` records every train config sent.
    """

    def __init__(self, cfg, handler):
        self.cfg, self.handler = cfg, handler
        self.configs, self.replies = [], []

    def get_node_ids(self):
        return list(range(int(self.cfg["num-clients"])))

    def push_messages(self, messages):
        from flwr.app import Context, RecordDict

        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.configs)}-{i}"
            self.configs.append(dict(msg.content["config"]))
            node = msg.metadata.dst_node_id
            node_config = {"partition-id": node, "num-partitions": self.cfg["num-clients"]}
            self.replies.append(self.handler(msg, Context(1, node, node_config, RecordDict(), dict(self.cfg))))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        ready = [r for r in self.replies if r.metadata.reply_to_message_id in wanted]
        self.replies = [r for r in self.replies if r.metadata.reply_to_message_id not in wanted]
        return ready

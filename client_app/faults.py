"""Client-side pieces of fault tolerance: injected failures for tests, and the node's answer to "who are you".

`fail-rate` makes a client's train call raise with that probability, drawn from (seed, round, partition)
so a test knows exactly which replies fail; Flower turns the exception into an error reply, which the
server counts as `failed` and leaves out of the average. With `fail-mode=exit` the client's process ends
instead (`os._exit`), as when Ray's OOM killer ends a ClientApp actor mid-round.
"""

from __future__ import annotations

import os

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client_app.shard import DATA_DIR_KEY, NAME_KEY
from flcore.config import Settings
from flcore.seeding import seeded_generator

FAULT_STREAM = 104729  # a fourth seed part, so failures do not reuse the training generator's stream


class InjectedFailure(RuntimeError):
    """The failure `fail-rate` asked for."""


def fails(seed: int, server_round: int, partition_id: int, rate: float) -> bool:
    if rate <= 0:
        return False
    draw = torch.rand((), generator=seeded_generator(seed, server_round, partition_id, FAULT_STREAM))
    return bool(draw < rate)


EXIT_CODE = 137  # what a process killed with SIGKILL (the OOM killer) reports


def inject_failure(cfg: Settings, server_round: int, partition_id: int) -> None:
    if not fails(cfg.seed, server_round, partition_id, cfg.fail_rate):
        return
    if cfg.fail_mode == "exit":
        os._exit(EXIT_CODE)
    raise InjectedFailure(f"injected failure (fail-rate {cfg.fail_rate}) in round {server_round}")


def identity_reply(msg: Message, context: Context) -> Message:
    """What the server orders nodes by (`rounds.sampling`): the partition id of a node serving a partition,
    and the operator's `node-name`, if set, of a node holding its own data (`data-dir`); nothing else."""
    node = context.node_config
    own_data = DATA_DIR_KEY in node
    metrics = {} if own_data or "partition-id" not in node else {"partition-id": int(node["partition-id"])}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if own_data and node.get(NAME_KEY):
        content["config"] = ConfigRecord({NAME_KEY: str(node[NAME_KEY])})
    return Message(content, reply_to=msg)

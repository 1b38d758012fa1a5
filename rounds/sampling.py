"""Node sampling and reply order that do not depend on node IDs, so a resumed run repeats the original.

Flower samples with the global `random` over `grid.get_node_ids()`, and node IDs are random numbers a
SuperLink draws when a node registers: a new SuperLink (a restarted simulation, a resumed run) maps the
same draw to different partitions, and FedAvg sums replies in arrival order, so even float rounding
differs between two runs. Here each node is asked once for its `partition-id` (a `query` message the
ClientApp answers from its node config), nodes are listed in partition order, and the strategy samples
with a `random` seeded by (seed, round) only. The same seed then picks the same partitions in every
round, and replies are aggregated in partition order, whatever the node IDs and arrival order are.

A node holding its own data (client-data=local) has no partition: it answers with the `node-name` its
operator gave it, if any. Such nodes follow the partitioned ones, named nodes by name, then unnamed ones
by node ID (stable while the SuperLink lives: a registered node keeps its ID across restarts).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import INFO

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

PARTITION_KEY = "partition-id"
NAME_KEY = "node-name"
QUERY = "query"


class NodeOrder:
    """Partition ID (or name) per node, learnt by asking each new node once; unknown nodes sort last by ID."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.partition: dict[int, int | None] = {}
        self.name: dict[int, str] = {}

    def learn(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Ask nodes not seen before for their partition id (building and sending messages draws from the
        global `random`, so its state is put back: the sampling stream must not depend on when nodes joined)."""
        unknown = [n for n in node_ids if n not in self.partition]
        if not unknown:
            return
        with kept_random():
            self._ask(grid, unknown)

    def _ask(self, grid: Grid, unknown: list[int]) -> None:
        ask = ConfigRecord({"ask": PARTITION_KEY})
        messages = [Message(RecordDict({"config": ask}), dst_node_id=n, message_type=QUERY) for n in unknown]
        answers: dict[int, int | None] = dict.fromkeys(unknown)
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                continue
            node, content = reply.metadata.src_node_id, reply.content
            metrics, config = content.metric_records.get("metrics"), content.config_records.get("config")
            if metrics is not None and isinstance(metrics.get(PARTITION_KEY), int):
                answers[node] = int(metrics[PARTITION_KEY])
            if config is not None and isinstance(config.get(NAME_KEY), str) and config[NAME_KEY]:
                self.name[node] = config[NAME_KEY]
        self.partition.update(answers)
        log(INFO, "%d new node(s): %s", len(unknown), sorted(self.label(n) for n in unknown))

    def key(self, node_id: int) -> tuple[int, int | str]:
        pid = self.partition.get(node_id)
        if pid is not None:
            return (0, pid)
        return (1, self.name[node_id]) if node_id in self.name else (2, node_id)

    def label(self, node_id: int) -> str:
        """How logs and reports name a node: `partition <i>`, its node-name, or `node <id>`."""
        kind, value = self.key(node_id)
        return (f"partition {value}", str(value), f"node {value}")[kind]

    def sort_replies(self, replies: Iterable[Message]) -> list[Message]:
        return sorted(replies, key=lambda r: self.key(r.metadata.src_node_id))


class OrderedGrid:
    """A view of a Grid whose `get_node_ids` lists nodes in partition order (asking new nodes first)."""

    def __init__(self, grid: Grid, order: NodeOrder) -> None:
        self._grid, self._order = grid, order

    def get_node_ids(self) -> list[int]:
        ids = list(self._grid.get_node_ids())
        self._order.learn(self._grid, ids)
        return sorted(ids, key=self._order.key)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@contextmanager
def seeded_random(seed: int, server_round: int) -> Iterator[None]:
    """Run the block with the global `random` seeded by (seed, round); restore the outer state after."""
    outer = random.getstate()
    random.seed(int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0]))
    try:
        yield
    finally:
        random.setstate(outer)


@contextmanager
def kept_random() -> Iterator[None]:
    """Run the block, then put the global `random` back: messages it sends must not move the sampling stream."""
    outer = random.getstate()
    try:
        yield
    finally:
        random.setstate(outer)

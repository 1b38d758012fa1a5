"""Node sampling and reply order that do not depend on node IDs, so a resumed run repeats the original.

Flower samples with the global `random` over `grid.get_node_ids()`, and node IDs are random numbers a
SuperLink draws when a node registers: a new SuperLink (a restarted simulation, a resumed run) maps the
same draw to different partitions, and FedAvg sums replies in arrival order, so even float rounding
differs between two runs. Here every node has a partition (or a name), nodes are listed in partition order,
and the strategy samples with a `random` seeded by (seed, round) only: the same seed picks the same
partitions in every round, and replies are aggregated in partition order, whatever the node IDs and arrival
order are.

Where a node's partition comes from (`partition-assignment`):

- `server` (simulation): the server gives new nodes the lowest free partitions in node-ID order and names
  the partition in every message it sends them (`PARTITION_KEY` in the message's config); the ClientApp
  trains the partition named. Nothing is asked, so the messages of a round are the sampled ones alone,
  however many nodes exist. Flower's simulated SuperNodes are virtual clients that all read the same data,
  so any of them can carry any partition.
- `node` (deployment): a node trains the partition of its own node config, so the server asks each new
  node for it once (a `query` message the ClientApp answers from its node config): one message per node.

A node holding its own data (client-data=local) has no partition, whatever `partition-assignment` says: it
is asked once and answers with the `node-name` its operator gave it, if any. Such nodes follow the
partitioned ones, named nodes by name, then unnamed ones by node ID (stable while the SuperLink lives: a
registered node keeps its ID across restarts).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flcore.run_data import PARTITION_KEY
from flcore.seeding import kept_random
from rounds.delegate import DelegatingGrid

NAME_KEY = "node-name"
QUERY = "query"


class NodeOrder:
    """Partition (or name) per node, given by the server (`partitions` = how many there are) or asked of each
    new node once (`partitions` = None); nodes without either sort last by ID."""

    def __init__(self, partitions: int | None = None, timeout: float = 60.0) -> None:
        self.partitions, self.timeout = partitions, timeout
        self.partition: dict[int, int | None] = {}
        self.name: dict[int, str] = {}

    @property
    def assigns(self) -> bool:
        return self.partitions is not None

    def learn(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Give or ask nodes not seen before their partition (building and sending messages draws from the
        global `random`, so its state is put back: the sampling stream must not depend on when nodes joined)."""
        unknown = [n for n in node_ids if n not in self.partition]
        if not unknown:
            return
        if self.assigns:
            self._assign(sorted(unknown))
            return
        with kept_random():
            self._ask(grid, unknown)

    def _assign(self, new: list[int]) -> None:
        """The lowest partitions no known node holds, in node-ID order; nodes beyond the partitions get none."""
        taken = {p for p in self.partition.values() if p is not None}
        free = (p for p in range(self.partitions) if p not in taken)
        self.partition.update((node, next(free, None)) for node in new)
        log(INFO, "partitions given to %d new node(s): %s", len(new), span([self.partition[n] for n in new]))

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
        names = sorted(self.name[n] for n in unknown if n in self.name)
        log(INFO, "%d new node(s): partitions %s, names %s", len(unknown), span(list(answers.values())), names[:20])

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

    def address(self, messages: Iterable[Message]) -> list[Message]:
        """The messages, each naming the partition the server gave its node (unchanged when nodes keep their own)."""
        if not self.assigns:
            return list(messages)
        return [self._named(m) for m in messages]

    def _named(self, message: Message) -> Message:
        pid = self.partition.get(message.metadata.dst_node_id)
        return message if pid is None else with_config(message, {PARTITION_KEY: pid})


def with_config(message: Message, entries: dict) -> Message:
    """`message` with `entries` added to its config record (the same node, type, ttl and group)."""
    content = RecordDict(dict(message.content))
    content["config"] = ConfigRecord({**message.content.config_records.get("config", {}), **entries})
    meta = message.metadata
    return Message(
        content, dst_node_id=meta.dst_node_id, message_type=meta.message_type, ttl=meta.ttl, group_id=meta.group_id
    )


def span(partitions: list[int | None]) -> str:
    """Many partition ids in a few words for the log: how many, their range, how many nodes have none."""
    known = sorted(p for p in partitions if p is not None)
    missing = len(partitions) - len(known)
    text = f"{len(known)} in {known[0]}..{known[-1]}" if known else "none"
    return text + (f", {missing} node(s) without one" if missing else "")


class OrderedGrid(DelegatingGrid):
    """A view of a Grid whose `get_node_ids` lists nodes in partition order (learning new nodes' partitions
    first), and whose messages name their node's partition where the server gives partitions out."""

    def __init__(self, grid: Grid, order: NodeOrder) -> None:
        super().__init__(grid)
        self.order = order

    def get_node_ids(self) -> list[int]:
        ids = list(self.grid.get_node_ids())
        self.order.learn(self.grid, ids)
        return sorted(ids, key=self.order.key)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self.order.address(messages))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(self.order.address(messages), timeout=timeout)

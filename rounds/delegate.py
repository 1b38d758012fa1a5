"""A strategy (and a Grid) that forwards every call to the one it holds, and how a strategy adopts a new global model.

Wrappers (server stages, FedNova's normalisation, extra client uploads) change one or two steps of a
Flower strategy by composition: they subclass this and override only those steps.

`adopt` exists because Flower's `Strategy.start` only passes the model a round returned on to the next
`configure_train`: a strategy that keeps its own reference model never learns that a server stage
replaced it. `strategies.wrapper.ServerStages` therefore hands the stages' output down the chain after
every aggregation, and each link makes it the base of its next update.

`after_stages` exists for methods whose last step must see the model the server stages made of the
aggregate, not the bare aggregate: CCVR computes its class statistics with the model the clients end
with, so under stage 3 (alignment) that is the aligned model. `ServerStages` calls it down the chain after
the round stages and before the post-hoc ones (`rounds.stage.Stages`).

`FromSentModel` is a `Delegating` that keeps the model each round's clients start from, for methods whose
server step is an update from it.

`DelegatingGrid` is the same idea for the Grid a strategy is handed: the Grid adapters (`rounds.polling`'s
prompt reply collection, `rounds.sampling`'s partition order) subclass it and override only the calls
they change.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from flcore.seeding import kept_random


class Delegating(Strategy):
    """Forwards sampling, aggregation and summary to `inner`, unchanged."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def adopt(self, arrays: ArrayRecord) -> None:
        """`arrays` is the global model now; a wrapper that keeps a model of its own overrides this."""
        adopt(self.inner, arrays)

    def after_stages(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> ArrayRecord:
        """The method's own step on the model the round stages returned; a wrapper with one overrides this."""
        return after_stages(self.inner, server_round, arrays, metrics)


class FromSentModel(Delegating):
    """A wrapper whose aggregation needs the model this round's clients started from (FedAvgM's and FedNova's
    server step, FedBE's Gaussian over the updates): `configure_train` keeps it as `sent`."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def sent_model(self) -> ArrayRecord:
        """The model the replies being aggregated started from; aggregating before any was sent is a bug."""
        if self.sent is None:
            raise RuntimeError(f"{type(self).__name__}.aggregate_train ran before configure_train: no model was sent")
        return self.sent


class AsksEveryNode(Delegating):
    """A wrapper that asks every connected node something after aggregation (CCVR's and CReFF's class statistics,
    FedETF's personalisation): `configure_train` keeps the round's Grid for it."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.grid: Grid | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.grid = grid
        return self.inner.configure_train(server_round, arrays, config, grid)

    def ask_every_node(
        self, arrays: ArrayRecord, config: ConfigRecord, action: str, timeout: float
    ) -> tuple[list[Message], int]:
        """Send `arrays` and `config` as a `query.<action>` message to every connected node; the replies in node
        order, and how many nodes were asked. The global `random` is left as it was, so sampling does not depend
        on it."""
        if self.grid is None:
            raise RuntimeError(f"{type(self).__name__} asked the nodes before configure_train: no grid to ask")
        nodes = list(self.grid.get_node_ids())
        content = RecordDict({"arrays": arrays, "config": config})
        messages = [Message(content, dst_node_id=n, message_type=f"query.{action}") for n in nodes]
        with kept_random():
            replies = self.grid.send_and_receive(messages, timeout=timeout)
        rank = {node: i for i, node in enumerate(nodes)}
        return sorted(replies, key=lambda r: rank.get(r.metadata.src_node_id, len(rank))), len(nodes)


class DelegatingGrid(Grid):
    """Forwards every Grid call to `grid`, unchanged."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


def adopt(strategy: Strategy, arrays: ArrayRecord) -> None:
    """Make `arrays` the model `strategy`'s next update starts from.

    A `Delegating` wrapper passes it down its chain. Flower's own strategies keep that model in
    `current_arrays` (an ArrayRecord in FedAvgM, QFedAvg and the DP wrappers, a dict of NumPy arrays in
    the FedOpt family): most reset it from `configure_train`'s arrays every round, but FedAvgM sets it
    once and then moves it with its own momentum step, so it is replaced here in the type it holds.
    Strategies without one (FedAvg, FedProx) base every round on `configure_train`'s arrays already.
    """
    if isinstance(strategy, Delegating):
        strategy.adopt(arrays)
        return
    current = getattr(strategy, "current_arrays", None)
    if isinstance(current, ArrayRecord):
        strategy.current_arrays = arrays
    elif isinstance(current, dict):
        strategy.current_arrays = {key: array.numpy() for key, array in arrays.items()}


def after_stages(strategy: Strategy, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> ArrayRecord:
    """`arrays` after `strategy`'s own step on the model the round stages made of the aggregate.

    A `Delegating` wrapper passes it down its chain, so a link anywhere in it (CCVR's calibration) can act;
    Flower's own strategies have no such step and hand `arrays` back unchanged. What the step measures
    goes into `metrics`, the round's.
    """
    if isinstance(strategy, Delegating):
        return strategy.after_stages(server_round, arrays, metrics)
    return arrays

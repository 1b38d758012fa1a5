"""How a round treats its clients, around any Flower strategy: who is sampled, which replies count.

`RoundPolicy` holds the training method's strategy and changes two steps of it. Sampling: nodes are
listed in partition order and sampled with a `random` seeded by (seed, round) (`rounds.sampling`), so a
resumed run repeats the original; with `partitions` set, the server gives nodes their partitions and
names one in each message instead of asking every node for its own. Aggregation: replies are screened
(`rounds.guard`) so failed, non-finite or malformed updates are never averaged, each client's
claimed weight is bounded (`rounds.weights`), and so is how far its update moves the model
(`rounds.norms`); a round needs `min_replies` good ones, or the global model stays as it was, and so does
an aggregate with NaN or Inf (finite updates can still overflow).
`max_empty_rounds` rounds in a row without one valid update stop the run instead of letting it finish
with the initial model, and a run in which no round aggregated anything fails at its end
(`require_an_update`), however short. Every aggregation reports its reply counts, and keeps the error
replies that say a ClientApp process died (`deaths`, for `rounds.restarts`).

Nodes holding their own data report their images per class (`class-counts`) and how many image files
they left out as unusable (`skipped-images`) with each update; the policy takes those counts out of the
metrics before the strategy averages them and hands them, per node, to `on_node_data` (the run report),
so a real federation's data is reported without being seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flcore.arrays import NON_FINITE, non_finite, reply_metrics
from flcore.local_data import CLASS_COUNTS_KEY, SKIPPED_KEY
from flcore.seeding import seeded_random
from rounds.delegate import Delegating
from rounds.guard import WEIGHT_KEY, Screened, screen
from rounds.norms import bound_updates
from rounds.restarts import process_died
from rounds.sampling import NodeOrder, OrderedGrid
from rounds.weights import WeightCaps, bound_weights

NodeData = dict[str, dict[str, int | list[int]]]  # node label -> its num-examples, class-counts, skipped-images
NodeDataSink = Callable[[int, NodeData], None]


class RoundPolicy(Delegating):
    """Seeded, node-ID-independent sampling and screened aggregation for any strategy."""

    def __init__(
        self,
        inner: Strategy,
        *,
        min_replies: int = 1,
        max_empty_rounds: int = 0,
        seed: int = 0,
        query_timeout: float = 60.0,
        partitions: int | None = None,
        weight_caps: WeightCaps | None = None,
        max_upload_mb: float = math.inf,
        max_update_ratio: float = math.inf,
        on_node_data: NodeDataSink | None = None,
    ) -> None:
        super().__init__(inner)
        self.on_node_data = on_node_data
        self.min_replies, self.seed = min_replies, seed
        self.weight_caps, self.max_upload_mb = weight_caps or WeightCaps(), max_upload_mb
        self.max_update_ratio = max_update_ratio
        self.max_empty_rounds, self._empty_rounds = max_empty_rounds, 0
        self.updated_rounds, self._last_problem = 0, "no round ran"
        self.deaths: dict[int, list[str]] = {}  # round -> error reasons of replies whose ClientApp process died
        self.nodes = NodeOrder(partitions, query_timeout)
        self._sent: int | None = None
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        with seeded_random(self.seed, server_round):
            messages = self.nodes.address(
                self.inner.configure_train(server_round, arrays, config, OrderedGrid(grid, self.nodes))
            )
        self._sent, self._global = len(messages), arrays
        self._stop_waiting_for_lost_nodes()
        picked = sorted((m.metadata.dst_node_id for m in messages), key=self.nodes.key)
        log(INFO, "round %s: sampled %s", server_round, [self.nodes.label(n) for n in picked])
        return messages

    def _stop_waiting_for_lost_nodes(self) -> None:
        """After the first round, sample from whoever is online instead of waiting for every node.

        Flower strategies wait (without timeout) until `min_available_nodes` are connected before sampling;
        the registry sets it to num-clients so round 1 starts with the full federation, but a node lost for
        good would then block every later round. `min_replies` nodes are enough from then on.
        """
        if getattr(self.inner, "min_available_nodes", 0) > self.min_replies:
            self.inner.min_available_nodes = self.min_replies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if died := [reply.error.reason for reply in replies if process_died(reply)]:
            self.deaths[server_round] = died
        checked = screen(replies, self._global, self.max_upload_mb)
        reported = take_node_data(checked.accepted, self.nodes.label)
        if reported and self.on_node_data is not None:
            self.on_node_data(server_round, reported)
        for node, claimed, cap in bound_weights(checked.accepted, self.weight_caps, self.nodes.partition.get):
            log(WARNING, "round %s: node %s claims %g examples; weighted as %g", server_round, node, claimed, cap)
        clipped = self._bound_updates(server_round, checked.accepted)
        missing = max(0, (self._sent or len(replies)) - len(replies))  # timed out or dropped: no reply at all
        counts = {
            "replies": len(checked.accepted),
            "rejected": len(checked.rejected),
            "failed": len(checked.failed) + missing,
            "clipped": clipped,
        }
        reasons = [reason for _, reason in checked.failed + checked.rejected]
        if missing:
            reasons.append(f"{missing} of {self._sent} sampled clients sent no reply within round-timeout")
        self._last_problem = (reasons or ["no client was sampled"])[0]
        self._stop_if_nothing_arrives(checked)
        if len(checked.accepted) < self.min_replies:
            log(
                WARNING,
                "round %s: %s valid replies, fewer than min-replies=%s; the global model stays as it was (%s)",
                server_round,
                len(checked.accepted),
                self.min_replies,
                counts,
            )
            return None, MetricRecord(counts)
        arrays, metrics = self.inner.aggregate_train(server_round, self.nodes.sort_replies(checked.accepted))
        metrics = MetricRecord() if metrics is None else metrics
        for key, value in counts.items():
            metrics[key] = value
        if arrays is not None and (bad := non_finite(arrays)):
            log(
                WARNING,
                "round %s: the aggregate has NaN or Inf in %s; the global model stays as it was",
                server_round,
                bad[:3],
            )
            self._last_problem = f"the aggregate of the valid updates had {NON_FINITE} in {bad[:3]}"
            return None, metrics
        self.updated_rounds += arrays is not None
        return arrays, metrics

    def _bound_updates(self, server_round: int, replies: list[Message]) -> int:
        """Clip updates far larger than the round's median (`max-update-ratio`); how many were clipped."""
        if self._global is None:
            return 0
        clipped = bound_updates(replies, self._global, self.max_update_ratio)
        for node, norm, bound in clipped:
            log(
                WARNING,
                "round %s: node %s's update has norm %.3g, above max-update-ratio x the median; clipped to %.3g",
                server_round,
                node,
                norm,
                bound,
            )
        return len(clipped)

    def require_an_update(self) -> None:
        """At the end of a run: a run in which no round aggregated one client update has failed, however short.

        `max-empty-rounds` stops a long run early; a run shorter than that would otherwise end `completed`
        with the initial model (every reply timed out, or was refused, say).
        """
        if not self.updated_rounds:
            raise RuntimeError(
                "no round of this run aggregated a single client update, so its model is the initial one; last "
                f"round's first problem: {self._problem_text()}"
            )

    def _stop_if_nothing_arrives(self, checked: Screened) -> None:
        """A fault that hits every client (a bad setting, a rejected message) would otherwise let the run
        finish round after round with the initial model and look like a result."""
        self._empty_rounds = 0 if checked.accepted else self._empty_rounds + 1
        if self.max_empty_rounds and self._empty_rounds >= self.max_empty_rounds:
            raise RuntimeError(
                f"{self._empty_rounds} rounds in a row without one valid client update (max-empty-rounds="
                f"{self.max_empty_rounds}); last round's first problem: {self._problem_text()}"
            )

    def _problem_text(self) -> str:
        """The last refusal, with what to change when it says the clients' training diverged."""
        if NON_FINITE not in str(self._last_problem):
            return str(self._last_problem)
        return (
            f"{self._last_problem} (the clients' training diverged: lower `lr`, or a loss weight such as "
            "`ratio-beta` with strategy=ratioloss)"
        )


def take_node_data(replies: Iterable[Message], label: Callable[[int], str]) -> NodeData:
    """Each reply's reported size and images per class, by node label; the counts are removed from its metrics,
    which the strategy then averages as usual (a mean histogram would mean nothing)."""
    out: NodeData = {}
    for reply in replies:
        metrics = reply_metrics(reply.content)
        if CLASS_COUNTS_KEY not in metrics:
            continue
        counts = [max(0, int(c)) for c in metrics[CLASS_COUNTS_KEY]]
        del metrics[CLASS_COUNTS_KEY]
        report = {"num-examples": int(metrics[WEIGHT_KEY]), CLASS_COUNTS_KEY: counts}
        if SKIPPED_KEY in metrics:
            report[SKIPPED_KEY] = max(0, int(metrics.pop(SKIPPED_KEY)))
        out[label(reply.metadata.src_node_id)] = report
    return out

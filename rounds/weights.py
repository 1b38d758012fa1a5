"""How much one client may weigh in an average: `num-examples` is the client's own claim, so it is bounded.

FedAvg weights each update by the `num-examples` its client reports. A client claiming 1e300 examples
would otherwise become the whole global model. The server caps each claim before the strategy sees it:

- a node that serves partition p of the server's own split (the server draws the same split as every
  client, `flcore.run_data.prepare`) weighs at most that partition's size;
- a node the server knows no size for (no partition id, or a partition outside its split) weighs at most
  `max-weight-ratio` times the round's lower median claim, so fewer than half of the replies cannot lift
  the cap;
- every claim is at most `max-examples`.

Strategies that ignore weights (`fedmedian`, `fedtrimmedavg`) are the robust choice when clients may be
hostile beyond their weights.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message

from flcore.arrays import reply_metrics
from rounds.guard import WEIGHT_KEY


@dataclass(frozen=True)
class WeightCaps:
    """The bounds above: known partition sizes, an absolute cap and a cap relative to the round's median."""

    max_examples: float = float("inf")
    max_ratio: float = float("inf")
    known: Mapping[int, int] = field(default_factory=dict)

    def caps(self, claims: Mapping[int, float], partition_of: Callable[[int], int | None]) -> dict[int, float]:
        """Node -> the most its reply may weigh this round (`claims`: node -> reported num-examples)."""
        relative = self.max_ratio * statistics.median_low(claims.values()) if claims else float("inf")
        out = {}
        for node in claims:
            size = self.known.get(partition_of(node))
            out[node] = min(self.max_examples, size if size is not None else relative)
        return out


def bound_weights(
    replies: Iterable[Message], caps: WeightCaps, partition_of: Callable[[int], int | None]
) -> list[tuple[int, float, float]]:
    """Lower each reply's `num-examples` to its cap, in place; returns (node, claimed, capped) of those lowered."""
    replies = list(replies)
    records = {r.metadata.src_node_id: reply_metrics(r.content) for r in replies}
    claims = {node: float(record[WEIGHT_KEY]) for node, record in records.items()}
    lowered = []
    for node, cap in caps.caps(claims, partition_of).items():
        if claims[node] > cap:
            claimed = records[node][WEIGHT_KEY]
            records[node][WEIGHT_KEY] = int(cap) if isinstance(claimed, int) else float(cap)
            lowered.append((node, claims[node], cap))
    return lowered

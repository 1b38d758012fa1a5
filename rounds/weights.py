"""How much one client may weigh in an average: `num-examples` is the client's own claim, so it is bounded.

FedAvg weights each update by the `num-examples` its client reports. A client claiming 1e300 examples
would otherwise become the whole global model. The server caps each claim before the strategy sees it:

- a node that serves partition p of the server's own split (the server draws the same split as every
  client, `flcore.run_data.prepare`) weighs at most that partition's size;
- a node the server knows no size for (no partition id, or a partition outside its split) weighs at most
  `max-weight-ratio` times the round's lower median claim, so fewer than half of the replies cannot lift
  the cap;
- every claim is at most `max-examples`.

A federation whose nodes hold their own data (`client-data=local`) has no split the server knows, so
every node falls under the relative cap: one node claiming `max-weight-ratio` (r) times the median
takes r / (r + k) of the average beside k honest nodes of equal size (91 % beside one, 59 % beside
seven, with the default r = 10). `weighting` (`WEIGHTINGS`) offers weights that trust the claims less:
`capped-median` caps every claim at the round's lower median claim (at most 1 / (k + 1) beside k
honest nodes at or above the median), `uniform` weighs every accepted reply 1 and reads no claim at all.

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

Weighting = Callable[[float, float, float], float]  # (claim, its cap, the round's lower median claim) -> weight

# What an accepted reply weighs in the average (`weighting`): its claim under the caps, that capped at the
# round's lower median claim, or 1 whatever it claims.
WEIGHTINGS: dict[str, Weighting] = {
    "examples": lambda claim, cap, median: min(claim, cap),
    "capped-median": lambda claim, cap, median: min(claim, cap, median),
    "uniform": lambda claim, cap, median: 1.0,
}


@dataclass(frozen=True)
class WeightCaps:
    """The bounds above: known partition sizes, an absolute cap and a cap relative to the round's median, and
    the weighting (a `WEIGHTINGS` name) applied under them."""

    max_examples: float = float("inf")
    max_ratio: float = float("inf")
    known: Mapping[int, int] = field(default_factory=dict)
    weighting: str = "examples"

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
    """Set each reply's `num-examples` to its weight (`caps.weighting`), in place; returns (node, claimed,
    weight) of the claims a cap or the median lowered (a uniform weight replaces every claim and lowers none)."""
    replies = list(replies)
    records = {r.metadata.src_node_id: reply_metrics(r.content) for r in replies}
    claims = {node: float(record[WEIGHT_KEY]) for node, record in records.items()}
    if not claims:
        return []
    median = statistics.median_low(claims.values())
    weigh = WEIGHTINGS[caps.weighting]
    lowered = []
    for node, cap in caps.caps(claims, partition_of).items():
        weight = weigh(claims[node], cap, median)
        if weight == claims[node]:
            continue
        claimed = records[node][WEIGHT_KEY]
        records[node][WEIGHT_KEY] = int(weight) if isinstance(claimed, int) else float(weight)
        if weight < claims[node] and caps.weighting != "uniform":
            lowered.append((node, claims[node], weight))
    return lowered

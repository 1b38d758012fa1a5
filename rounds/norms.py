"""How far one client may move the global model: each update's norm is bounded by the round's median norm.

The screen (`rounds.guard`) refuses NaN and Inf, but a finite update can still be huge: one client of 8
sending weights of 1e30 moves a FedAvg model to 1.25e29. The server therefore measures each accepted
update, `reply - global` over every array, and clips any whose L2 norm exceeds `max-update-ratio` times
the round's lower median norm down to that bound, keeping its direction (norm clipping, as in Sun et al.,
"Can You Really Backdoor Federated Learning?", 2019). The lower median (of 2 norms, the smaller) is used
so that fewer than half of the replies cannot lift the bound. Clipping happens on the replies before the
strategy sees them, so it holds under every strategy.

The norm is taken over the floating-point arrays (weights, BatchNorm's running statistics); integer
buffers (BatchNorm's `num_batches_tracked`, a count of local steps) are counters, not a direction, and are
left as sent. It is computed on the update divided by its largest entry, so an update of 1e300 in float64
is measured and clipped without overflow.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from flcore.arrays import reply_arrays


def _deltas(reply: Message, reference: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """`reply - global` array by array in float64, so only one array's copy is held at a time."""
    arrays = reply_arrays(reply.content)
    with np.errstate(over="ignore", invalid="ignore"):
        for key, base in reference.items():
            yield key, arrays[key].numpy().astype(np.float64) - base


def update_norm(reply: Message, reference: dict[str, np.ndarray]) -> tuple[float, float]:
    """The update's L2 norm as (largest entry, norm of the update divided by it): their product may overflow,
    each factor does not. (0, 0) for no change; (inf, 1) if the difference itself overflowed."""
    scale = max((float(np.max(np.abs(d))) for _, d in _deltas(reply, reference) if d.size), default=0.0)
    if scale == 0.0 or not math.isfinite(scale):
        return (scale, 0.0) if scale == 0.0 else (math.inf, 1.0)
    return scale, math.sqrt(sum(float(np.sum((d / scale) ** 2)) for _, d in _deltas(reply, reference)))


def _clip(reply: Message, reference: dict[str, np.ndarray], norm: tuple[float, float], bound: float) -> None:
    """Replace the reply's arrays by `global + update * bound / norm`, each in its own dtype; an update whose
    difference overflowed cannot be scaled and becomes no change."""
    scale, unit_norm = norm
    arrays = reply_arrays(reply.content)
    for key, delta in _deltas(reply, reference):
        step = (delta / scale) * (bound / unit_norm) if math.isfinite(scale) else np.zeros_like(delta)
        arrays[key] = Array((reference[key] + step).astype(np.dtype(arrays[key].dtype)))


def bound_updates(
    replies: Iterable[Message], reference: ArrayRecord, max_ratio: float
) -> list[tuple[int, float, float]]:
    """Clip, in place, each reply whose update norm exceeds `max_ratio` x the round's lower median; returns
    (node, norm, bound) of those clipped. `reference` is the global model the replies started from."""
    replies = list(replies)
    if not replies or not math.isfinite(max_ratio):
        return []
    base = {key: a.numpy().astype(np.float64) for key, a in reference.items() if np.dtype(a.dtype).kind == "f"}
    norms = [update_norm(reply, base) for reply in replies]
    bound = max_ratio * statistics.median_low(scale * unit for scale, unit in norms)
    clipped = []
    for reply, norm in zip(replies, norms, strict=True):
        if norm[0] * norm[1] > bound:
            _clip(reply, base, norm, bound)
            clipped.append((reply.metadata.src_node_id, norm[0] * norm[1], bound))
    return clipped

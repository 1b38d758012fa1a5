"""Screen client replies before any strategy averages them.

A real federation has clients that crash, time out, or send garbage (a diverged model full of NaN, a
different architecture, a truncated upload). Flower hands such replies to the strategy as they came:
error replies are skipped by FedAvg, but a NaN update is averaged into the global model, and a reply
with different keys raises `InconsistentMessageReplies`, which stops the whole run. `screen` sorts the
replies into accepted ones and refused ones with a reason per node, so only well-formed, finite updates
of the current global model's exact keys and shapes ever reach the strategy.

Arrays are read with `flcore.arrays.read_npy` (`np.load(..., allow_pickle=False)`): nothing a client
sends is unpickled or executed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from flcore.arrays import NON_FINITE, ArrayProblem, read_npy, read_numeric, reply_arrays, reply_metrics

WEIGHT_KEY = "num-examples"


@dataclass
class Screened:
    """Replies split into those to aggregate and those refused, with a reason per source node."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)


def _reply_problem(reply: Message, reference: dict | None, with_model: bool) -> str | None:
    content = reply.content
    models = 1 if with_model else 0
    if len(content.array_records) != models or len(content.metric_records) != 1:
        return (
            f"expected {models} ArrayRecord and one MetricRecord, got {len(content.array_records)} and "
            f"{len(content.metric_records)}"
        )
    metrics = reply_metrics(content)
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
        return f"metric '{WEIGHT_KEY}' is {weight!r}; expected a positive number"
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v, dtype=float)))]
    if bad:
        return f"metrics {bad[:3]} are {NON_FINITE}"
    if reference is None or not with_model:
        return None
    try:
        read_numeric(reply_arrays(content), reference)
    except ArrayProblem as err:
        return f"{err} (global model)"
    return None


def _metric_keys(reply: Message) -> tuple[str, ...]:
    return tuple(sorted(reply_metrics(reply.content).keys()))


def _upload_layout(reply: Message, max_bytes: float) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """Shapes of the `.npy` entries in the reply's ConfigRecords (CCVR/CReFF uploads), each read with the
    checked reader: `ArrayProblem` if they are larger than `max_bytes` together (checked before any is
    decoded) or one is not finite numeric."""
    entries = [
        (name, key, value)
        for name, record in reply.content.config_records.items()
        for key, value in record.items()
        if isinstance(value, bytes)
    ]
    size = sum(len(value) for *_, value in entries)
    if size > max_bytes:
        raise ArrayProblem(f"uploads of {size / 2**20:.1f} MB exceed max-upload-mb = {max_bytes / 2**20:g}")
    return tuple(sorted((name, key, read_npy(key, value).shape) for name, key, value in entries))


def _signature(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    return {k: tuple(a.shape) for k, a in arrays.items()}


def _candidate(
    reply: Message, signature: dict | None, max_upload_bytes: float, with_model: bool
) -> tuple[str | None, tuple]:
    """(problem, candidate entry) of one reply; whatever reading it raises refuses this reply only."""
    try:
        problem = _reply_problem(reply, signature, with_model)
        if problem is not None:
            return problem, ()
        return None, (reply, _metric_keys(reply), _upload_layout(reply, max_upload_bytes))
    except ArrayProblem as err:
        return f"{err} (upload)", ()
    except Exception as err:  # MemoryError, odd metric values, anything a crafted reply may provoke
        return f"unreadable reply ({type(err).__name__}: {err})", ()


def screen(
    replies: Iterable[Message],
    reference: ArrayRecord | None,
    max_upload_mb: float = math.inf,
    *,
    with_model: bool = True,
) -> Screened:
    """Accept the replies a strategy can safely average; log and count the rest.

    `reference` is the global model sent this round; without it (unit use) the first well-formed reply
    serves as reference. Replies to an upload-only request (CCVR's statistics, `with_model=False`) must
    carry no model, only their metrics and upload. Replies whose metric keys differ from the most common set
    are refused too, since
    Flower's metric aggregation would raise on them, and so are replies whose uploads (`.npy` entries of
    their ConfigRecords: CCVR/CReFF statistics) exceed `max_upload_mb`, are not finite numbers or have
    other keys or shapes than most replies', since the server's calibration stacks them. Whatever reading
    a reply raises (a MemoryError included) refuses that reply and no other.
    """
    out = Screened()
    signature = _signature(reference) if reference is not None else None
    candidates: list[tuple[Message, tuple, tuple]] = []  # reply, its metric keys, its upload arrays' shapes
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            out.failed.append((node, f"error reply {reply.error.code}: {reply.error.reason}"))
            continue
        problem, candidate = _candidate(reply, signature, max_upload_mb * 2**20, with_model)
        if problem is None:
            candidates.append(candidate)
        if problem is None and signature is None and with_model:
            signature = _signature(reply_arrays(reply.content))
        if problem is not None:
            out.rejected.append((node, problem))
    for what, index in (("metric keys", 1), ("upload arrays", 2)):
        common = Counter(c[index] for c in candidates).most_common(1)[0][0] if candidates else None
        for c in candidates:
            if c[index] != common:
                out.rejected.append((c[0].metadata.src_node_id, f"{what} {list(c[index])} differ from {list(common)}"))
        candidates = [c for c in candidates if c[index] == common]
    out.accepted = [c[0] for c in candidates]
    for node, reason in out.failed:
        log(WARNING, "node %s failed this round: %s", node, reason)
    for node, reason in out.rejected:
        log(WARNING, "node %s: update rejected, not averaged: %s", node, reason)
    return out

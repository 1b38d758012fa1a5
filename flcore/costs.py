"""What a client's round costs, reported with its train metrics so the comparison table can show it.

`upload-bytes` counts the reply's records as Flower serialises them (`count_bytes`: array payloads,
extra uploads, keys), plus the metric record itself. `peak-rss-mb` is the client process's peak
resident memory (`ru_maxrss`); in simulation one Ray actor serves many partitions, so it is the peak of
that worker process, the upper bound of one client's footprint.
"""

from __future__ import annotations

import resource
import sys

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

# Entries the cost metrics add to the metric record itself (two keys and two float values).
_OWN_METRIC_BYTES = len("upload-bytes") + len("peak-rss-mb") + 16


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def cost_metrics(arrays: ArrayRecord, metrics: MetricRecord, *extra: ConfigRecord) -> dict[str, float]:
    """`upload-bytes` of a reply made of `arrays`, `metrics` and any extra records; `peak-rss-mb`."""
    size = arrays.count_bytes() + metrics.count_bytes() + _OWN_METRIC_BYTES + sum(r.count_bytes() for r in extra)
    return {"upload-bytes": float(size), "peak-rss-mb": peak_rss_mb()}

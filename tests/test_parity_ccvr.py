"""CCVR against FL-bench's implementation: pooled class Gaussians and virtual-feature counts.

The expected numbers come from FL-bench's own code run on the fixture's inputs (`tests/fixtures/parity/
ccvr.json`: its `source` and `recipe` say which file, which commit and how). Luo et al. published no code.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from strategies.ccvr import pooled_gaussians, sample_virtual_features

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "ccvr.json").read_text())
DIM = 4


def uploads_of(stats: list[dict]) -> list[dict[str, np.ndarray]]:
    """FL-bench's per-client packages as this project's uploads (absent classes: zero mean and covariance)."""
    return [{k: np.asarray(s[k], np.float64) for k in ("counts", "means", "covs")} for s in stats]


def unbiased_uploads() -> list[dict[str, np.ndarray]]:
    """What this project's clients send for the fixture's features: count, mean, covariance with n - 1."""
    out = []
    for client in FIXTURE["features"]:
        rows = [np.asarray(f, np.float64).reshape(-1, DIM) for f in client]
        out.append(
            {
                "counts": np.array([len(r) for r in rows], np.float64),
                "means": np.stack([r.mean(0) if len(r) else np.zeros(DIM) for r in rows]),
                "covs": np.stack([np.cov(r.T) if len(r) > 1 else np.zeros((DIM, DIM)) for r in rows]),
            }
        )
    return out


def assert_matches(pooled: tuple[np.ndarray, np.ndarray, np.ndarray], expected: dict) -> None:
    counts, means, covs = pooled
    for c, (mean, cov) in enumerate(zip(expected["means"], expected["covs"], strict=True)):
        assert np.allclose(means[c], mean, atol=1e-6)
        if cov is not None:  # FL-bench gives no covariance for a class seen once
            assert np.allclose(covs[c], cov, atol=1e-5)
        else:
            assert counts[c] == 1


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ("client_stats_flbench", "flbench_pooled_from_flbench_stats"),
        ("unbiased", "flbench_pooled_from_unbiased_stats"),
    ],
)
def test_pooled_means_and_covariances_match_flbench_on_the_same_client_statistics(stats, expected):
    uploads = unbiased_uploads() if stats == "unbiased" else uploads_of(FIXTURE[stats])
    assert_matches(pooled_gaussians(uploads), FIXTURE[expected])


def test_unbiased_client_covariances_pool_to_the_union_sample_covariance_unlike_flbenchs_biased_ones():
    """The documented departure: clients send n - 1 covariances, so pooling is exact; FL-bench's send n."""
    _, _, ours = pooled_gaussians(unbiased_uploads())
    flbench = FIXTURE["flbench_pooled_from_flbench_stats"]["covs"]
    for c in range(3):
        union = np.concatenate([np.asarray(client[c]).reshape(-1, DIM) for client in FIXTURE["features"]])
        assert np.allclose(ours[c], np.cov(union.T), atol=1e-9)
        assert np.trace(np.asarray(flbench[c])) < np.trace(ours[c])  # biased client covariances pool smaller


def test_virtual_features_per_class_match_flbench():
    counts, means, covs = pooled_gaussians(unbiased_uploads())
    per_class = FIXTURE["sample_per_class"]
    _, labels = sample_virtual_features(counts, means, covs, per_class, np.random.default_rng(0))
    assert np.bincount(labels.numpy(), minlength=len(counts)).tolist() == FIXTURE["virtual_counts"]

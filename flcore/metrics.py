"""Classification metrics for long-tailed evaluation: overall, balanced, per class and per group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predictions as columns."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarize(preds: np.ndarray, labels: np.ndarray, num_classes: int, groups: Mapping[str, Sequence[int]]) -> dict:
    """Accuracy, balanced accuracy (mean per-class recall over classes present), per-class and group accuracy."""
    cm = confusion_matrix(preds, labels, num_classes)
    support = cm.sum(1)
    per_class = np.divide(np.diag(cm), support, out=np.full(num_classes, np.nan), where=support > 0)
    present = support > 0
    out = {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "balanced-accuracy": float(np.nanmean(per_class)) if present.any() else float("nan"),
        "per-class-accuracy": [float(v) for v in per_class],
        "confusion-matrix": cm.tolist(),
    }
    for name, classes in groups.items():
        vals = [per_class[c] for c in classes if present[c]]
        out[f"{name}-accuracy"] = float(np.mean(vals)) if vals else float("nan")
    return out


def row_normalised(cm: np.ndarray) -> np.ndarray:
    """Each true class's row divided by its count (rows of absent classes stay zero)."""
    rows = cm.sum(1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)

"""The paper's Figure 4: confusion matrices of the global model without and with alignment."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from flcore.metrics import row_normalised  # noqa: E402


def plot_pair(
    cm_before: np.ndarray,
    cm_after: np.ndarray,
    before: dict,
    after: dict,
    classes: Sequence[str],
    teacher: str,
) -> Figure:
    """Row-normalised confusion matrices side by side, titled with overall and many/medium/few accuracy."""
    n = len(classes)
    side = min(9, 0.4 * n + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 0.8))
    for ax, cm, scores, name in ((axes[0], cm_before, before, "without"), (axes[1], cm_after, after, "with")):
        im = ax.imshow(row_normalised(cm), vmin=0, vmax=1, cmap="Blues")
        groups = " ".join(
            f"{g} {scores[f'{g}-accuracy']:.2f}"
            for g in ("many", "medium", "few")
            if scores[f"{g}-accuracy"] == scores[f"{g}-accuracy"]
        )
        ax.set(xlabel="predicted", ylabel="true", title=f"{name} alignment: acc {scores['accuracy']:.3f}\n{groups}")
        if n <= 20:
            ax.set_xticks(range(n), classes, rotation=45, ha="right")
            ax.set_yticks(range(n), classes)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"Global alignment (teacher: {teacher})", fontsize=9)
    return fig

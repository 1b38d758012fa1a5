"""Two confusion matrices side by side, titled with overall and many/medium/few accuracy.

Each aligned run draws its `alignment-step.png` with it: the global model right before and right after
the last round's alignment step (one model, one step). The paper's Figure 4 compares two runs instead,
one trained with alignment and one without; `bench/compare.py` draws it with the same function from the
`ours` and `ours-no-align` cells of a grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from flcore.metrics import row_normalised

matplotlib.use("Agg")  # files only, never a window; pyplot takes its backend at the first figure, not at import

GROUPS = ("many", "medium", "few")


def panel_title(name: str, scores: Mapping[str, float | None]) -> str:
    """`name: acc 0.812` over the group accuracies that exist (a group without classes is NaN or None)."""
    groups = " ".join(
        f"{g} {scores[f'{g}-accuracy']:.2f}"
        for g in GROUPS
        if scores.get(f"{g}-accuracy") is not None and scores[f"{g}-accuracy"] == scores[f"{g}-accuracy"]
    )
    return f"{name}: acc {scores['accuracy']:.3f}\n{groups}"


def plot_pair(
    cm_left: np.ndarray,
    cm_right: np.ndarray,
    left: Mapping[str, float | None],
    right: Mapping[str, float | None],
    classes: Sequence[str],
    names: tuple[str, str],
    title: str,
) -> Figure:
    """Row-normalised confusion matrices side by side, each titled with its name and accuracies."""
    n = len(classes)
    side = min(9, 0.4 * n + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 0.8))
    for ax, cm, scores, name in ((axes[0], cm_left, left, names[0]), (axes[1], cm_right, right, names[1])):
        im = ax.imshow(row_normalised(cm), vmin=0, vmax=1, cmap="Blues")
        ax.set(xlabel="predicted", ylabel="true", title=panel_title(name, scores))
        if n <= 20:
            ax.set_xticks(range(n), classes, rotation=45, ha="right")
            ax.set_yticks(range(n), classes)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return fig

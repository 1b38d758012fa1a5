import math

import numpy as np

from flcore.metrics import confusion_matrix, summarize


def test_metrics_on_a_known_case():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    cm = confusion_matrix(preds, labels, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]
    out = summarize(preds, labels, 4, {"many": [0], "medium": [1], "few": [2, 3]})
    assert out["accuracy"] == 4 / 8
    assert math.isclose(out["balanced-accuracy"], (0.75 + 0.5 + 0.0) / 3)
    assert out["per-class-accuracy"][:3] == [0.75, 0.5, 0.0] and math.isnan(out["per-class-accuracy"][3])
    assert out["many-accuracy"] == 0.75 and out["medium-accuracy"] == 0.5 and out["few-accuracy"] == 0.0

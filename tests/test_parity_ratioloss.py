"""The Ratio Loss's class-weight estimate against its authors' code (balanced-fl/Addressing-Class-Imbalance-FL,
`models/Fed.py`: `outlier_detect` and `whole_determination`), run outside the project on the fixed class
updates the fixture's recipe builds; the fixture names the file and commit."""

import hashlib
import json
from pathlib import Path

import numpy as np

from strategies import ratio_loss

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "ratioloss.json").read_text())
CLASSES, DIM, UNIT = 26, 6, 2.0**-10


def steps_of(seed: int) -> np.ndarray:
    """Every class's update of every classifier weight in units of 2^-10, as the fixture's recipe says."""
    rs = np.random.RandomState(seed)
    rs.randint(-8, 9, size=(CLASSES, DIM))  # the global weights: the updates do not depend on them
    steps = rs.randint(-3, 4, size=(CLASSES, CLASSES, DIM))
    rows, cols = np.meshgrid(np.arange(CLASSES), np.arange(DIM), indexing="ij")
    owner = rs.randint(0, 24, size=(CLASSES, DIM))
    boost = rs.randint(5, 10, size=(CLASSES, DIM))
    rival = rs.rand(CLASSES, DIM) < 0.3
    steps[owner, rows, cols] = boost
    steps[((owner + 1) % 24)[rival], rows[rival], cols[rival]] = -boost[rival]
    steps[:, 0, 0] = 0
    steps[24, 0, 0], steps[0, 0, 0] = 1024, 1  # class 24's only weight: the others' mean is 1/25 unit
    steps[:, 1, 5] = 0  # all zero: no owner
    steps[:, 2, 5] = -1
    steps[3, 2, 5] = 0  # a unique zero maximum: class 3 owns it
    steps[:, 3, 4] = 0
    steps[5, 3, 4] = steps[6, 3, 4] = 9  # a tie: no owner
    steps[:, 4, 1] = 0
    steps[8, 4, 1], steps[9, 4, 1] = 5, -4  # exactly 80 %: class 8 still owns it
    return steps


def updates() -> np.ndarray:
    steps = steps_of(FIXTURE["seed"])
    assert hashlib.sha256(steps.astype(np.int64).tobytes()).hexdigest() == FIXTURE["steps_sha256"]
    return (steps * UNIT).astype(np.float32)


def test_the_weights_each_class_dominates_match_the_authors():
    owner = ratio_loss.owners(updates())
    assert [int((owner == p).sum()) for p in range(CLASSES)] == FIXTURE["owned"]


def test_ratios_and_class_weights_match_the_authors_including_the_degenerate_and_capped_classes():
    ratios = ratio_loss.ratio_estimates(updates())
    assert np.allclose(ratios, FIXTURE["ratios"], rtol=1e-5)
    assert ratios[25] == ratio_loss.DEGENERATE_RATIO == 10.0  # class 25 dominates no weight
    assert ratios[24] > ratio_loss.RATIO_CAP  # 1024 units against a mean push of 1/25 unit
    assert np.allclose(ratio_loss.class_weights(updates(), 1.0, 0.1), FIXTURE["weights"], atol=1e-5)

"""FedLC's calibrated loss against FL-bench's (KarhouTam/FL-bench, `src/client/fedlc.py`), run outside the
project on the fixture's logits, labels and label counts for several tau; the fixture names the file and commit."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flcore.losses import fedlc_loss, fedlc_offsets

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "fedlc.json").read_text())


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"tau{c['tau']}")
def test_fedlc_loss_matches_fl_bench(case):
    logits, labels = torch.tensor(FIXTURE["logits"], dtype=torch.float32), torch.tensor(FIXTURE["labels"])
    offsets = fedlc_offsets(np.array(FIXTURE["counts"]), case["tau"])
    assert float(fedlc_loss(logits, labels, offsets)) == pytest.approx(case["loss"], rel=1e-6)

"""Random generators every process derives alike from integers (seed, round, partition), so a client's
shuffles, a fault's draw or a server stage's sampling repeat in any process and on any machine."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator seeded from several integers (seed, round, partition), stable across processes."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))

"""Random generators every process derives alike from integers (seed, round, partition), so a client's
shuffles, a fault's draw or a server stage's sampling repeat in any process and on any machine."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator seeded from several integers (seed, round, partition), stable across processes."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


@contextmanager
def seeded_random(seed: int, server_round: int) -> Iterator[None]:
    """Run the block with the global `random` seeded by (seed, round); restore the outer state after."""
    outer = random.getstate()
    random.seed(int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0]))
    try:
        yield
    finally:
        random.setstate(outer)


@contextmanager
def kept_random() -> Iterator[None]:
    """Run the block, then put the global `random` back: messages it sends must not move the sampling stream."""
    outer = random.getstate()
    try:
        yield
    finally:
        random.setstate(outer)

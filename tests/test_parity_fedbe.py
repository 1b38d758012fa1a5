"""FedBE's Gaussian over the client updates against the authors' code: the mean and standard deviation
of the weights their `SWAG_server.construct_models` (gaussian mode, var_scale 0.1) draws, on fixed weights.

The fixture holds the distribution's parameters read from their sampler (its "recipe" says how: the
normal draw replaced by fixed values); here the project's `update_gaussian` takes the same weights, and
its sampler's draws are checked to follow the parameters it returns.
"""

import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from strategies.fedbe import sample_models, update_gaussian

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "fedbe.json").read_text())


def fixture_gaussian():
    inputs = FIXTURE["inputs"]
    start = {k: np.asarray(v, np.float32) for k, v in inputs["start"].items()}
    clients = [{k: np.asarray(v, np.float32) for k, v in c.items()} for c in inputs["clients"]]
    return start, update_gaussian(start, clients, list(start), float(inputs["var_scale"]))


def test_fedbe_gaussian_matches_the_authors_swag_server():
    _, (mean, std) = fixture_gaussian()
    for key, want in FIXTURE["expected"]["mean"].items():
        assert np.allclose(mean[key], want, rtol=0, atol=2e-6), key
    for key, want in FIXTURE["expected"]["std"].items():
        assert np.allclose(std[key], want, rtol=1e-4, atol=1e-8), key


def test_fedbe_sampler_draws_from_the_gaussian_it_fits():
    start, (mean, std) = fixture_gaussian()
    averaged = ArrayRecord({k: torch.from_numpy(v) for k, v in start.items()})
    drawn = sample_models(averaged, mean, std, 4000, np.random.default_rng(0))
    for key in mean:
        values = np.stack([m[key].numpy() for m in drawn]).astype(np.float64)
        assert np.allclose(values.mean(0), mean[key], rtol=0, atol=4 * std[key].max() / np.sqrt(4000) + 1e-6)
        assert np.allclose(values.std(0), std[key], rtol=0.1)

"""FedDF's server step against the authors' code: the loss on the clients' averaged logits (T = 1, KL as
their `BaseKTSolver.divergence`), the gradient clipped to norm 5 and the Adam step, on a tiny fixed model.

The fixture holds the numbers their `NoiseKTSolver.update_student` gave (its "source" and "recipe" say
which file and how); here the project's `ensemble_targets` and `Distiller` take the same inputs.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flcore.device import CPU
from strategies.ensemble_distillation import Distiller
from strategies.feddf import CLIP_NORM, ensemble_targets

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "feddf.json").read_text())


def test_feddf_distillation_steps_match_the_authors_update_student():
    inputs, expected = FIXTURE["inputs"], FIXTURE["expected"]
    student = nn.Linear(4, 3)
    with torch.no_grad():
        student.weight.copy_(torch.tensor(inputs["weight"]))
        student.bias.copy_(torch.tensor(inputs["bias"]))
    distiller = Distiller(student, torch.optim.Adam(student.parameters(), lr=1e-3), CPU, max_norm=CLIP_NORM)
    for s, (x, teachers) in enumerate(zip(inputs["x"], inputs["teacher_logits"], strict=True)):
        target = ensemble_targets([torch.tensor(t) for t in teachers])
        loss = distiller.step(torch.tensor(x), target)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters()]))
        assert float(loss) == pytest.approx(expected["losses"][s], rel=1e-5)
        assert float(norm) == pytest.approx(expected["grad_norms_after_clip"][s], rel=1e-5)
        assert np.allclose(student.weight.detach().numpy(), expected["weight"][s], rtol=0, atol=1e-6)
        assert np.allclose(student.bias.detach().numpy(), expected["bias"][s], rtol=0, atol=1e-6)

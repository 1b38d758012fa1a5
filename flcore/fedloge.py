"""FedLoGe's model pieces (Xiao et al., ICLR 2024, "FedLoGe: Joint Local and Generic Federated Learning under
Long-tailed Data"; code github:ZackZikaiXiao/FedLoGe): the static sparse ETF classifier (SSE-C), the auxiliary
global head, its realignment, and the client's local head.

- SSE-C: a simplex ETF [d, C] with a fraction `fedloge-sparsity` of its entries zeroed, whose remaining entries are
  then moved by Adam (lr 1e-4) towards columns of norm 0.1 that are as far apart in angle as can be
  (`sparsify_etf`, their `gen_sparse_ETF`). It is the weight of a linear layer that never trains (their `g_head`,
  whose bias keeps nn.Linear's initial draw and never trains either). The backbone learns through it alone.
- g_aux: a linear head trained on the same features with the backbone's gradient cut (`features.detach()`), and
  averaged by the server: the global head. The generic model is the backbone with g_aux realigned: every class row
  rescaled to norm 1.7 (`realign_global`, their `globaltest_calibra`), so the head classes' longer rows no longer
  win by length.
- l_head: each client's own linear head on the detached features, never aggregated (fitted in the client's
  personalisation, `flcore.personalize.fedloge_personalize`). The personalised model adds
  it to g_aux with g_aux's rows rescaled to the norms of the client's l_head rows (`local_realign`, their
  `update_weights_norm_init` with zero epochs) and masks the classes the client has no images of (their
  `localtest`, `p_mode = 1`). Both heads are linear, so the personalised head is one linear layer
  (`personal_head`): the server scores it like any model of the run.

The classifier module (`FedLoGeClassifier`) holds g_aux and SSE-C; its forward is the generic model (realigned
g_aux), which the server evaluates and stage 3 aligns. A client's step trains through `ClientStep`, whose forward
is SSE-C's logits and which keeps g_aux's logits of the detached features for `client_loss`. The SSE-C is a buffer:
the server draws it once (`strategies.fedloge`) and every client reads it from the global model; a model built
anywhere else holds zeros until then, and a client refuses to train on those.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SSE_LR = 1e-4  # gen_sparse_ETF's Adam learning rate
SSE_NORM = 0.1  # the column norm gen_sparse_ETF pulls every class vector towards
SSE_COS_CLAMP = 0.99999  # its clamp of the largest cosine before acos
REALIGN_NORM = 1.7  # globaltest_calibra's row norm of the realigned global head


def sparsify_etf(dense: torch.Tensor, zeros: torch.Tensor, steps: int) -> torch.Tensor:
    """The SSE-C weight [d, C] (columns are classes) from a simplex ETF `dense` [d, C] and the boolean mask `zeros` of
    the entries to zero: `steps` Adam steps on the non-zero entries of norm_loss + angle_loss, where norm_loss sums
    (||column|| - 0.1)^2 and angle_loss is minus the mean over classes of the angle to the nearest other class
    (their `gen_sparse_ETF`, whose loop runs 10000 steps)."""
    weight = dense.detach().clone().float().masked_fill(zeros, 0.0).requires_grad_(True)
    keep = (weight != 0).float()
    opt = torch.optim.Adam([weight], lr=SSE_LR)
    for _ in range(steps):
        opt.zero_grad()
        norms = torch.linalg.vector_norm(weight, dim=0)
        norm_loss = ((norms - SSE_NORM) ** 2).sum()
        unit = weight / norms
        cos = unit.t() @ unit
        cos = cos - torch.diag(torch.diagonal(cos) + 1.0)  # a class is never its own nearest: its cosine -1
        angle_loss = -torch.acos(cos.max(dim=1).values.clamp(-SSE_COS_CLAMP, SSE_COS_CLAMP)).mean()
        (norm_loss + angle_loss).backward()
        weight.grad *= keep
        opt.step()
    return weight.detach()


def realign_global(weight: torch.Tensor, norm: float = REALIGN_NORM) -> torch.Tensor:
    """g_aux's class rows rescaled to length `norm` (their `globaltest_calibra`: w_c * 1.7 / ||w_c||)."""
    return weight * (norm / torch.linalg.vector_norm(weight, dim=1, keepdim=True))


def local_realign(global_weight: torch.Tensor, local_weight: torch.Tensor) -> torch.Tensor:
    """g_aux's class rows times the lengths of the client's l_head rows (their `update_weights_norm_init`)."""
    return global_weight * torch.linalg.vector_norm(local_weight, dim=1, keepdim=True)


def personal_head(g_aux: nn.Linear, l_head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The personalised head as one linear layer: l_head(f) + local_realign(g_aux)(f), weight and bias."""
    weight = l_head.weight + local_realign(g_aux.weight, l_head.weight)
    return weight.detach(), (l_head.bias + g_aux.bias).detach()


class FedLoGeClassifier(nn.Module):
    """g_aux (trained, averaged) and the SSE-C (buffers `sse`, `sse_bias`: fixed, drawn by the server).

    The forward is the generic model: g_aux with its rows realigned to `row_norm` (1.7). A personalised copy holds
    the client's head in g_aux's place (`personalize`): `row_norm` 0 leaves its rows as they are, and the classes
    `allowed` marks 0 (the ones the client has no images of) never win."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.g_aux = nn.Linear(in_dim, num_classes)
        self.register_buffer("sse", torch.zeros(num_classes, in_dim))
        self.register_buffer("sse_bias", torch.zeros(num_classes))
        self.register_buffer("row_norm", torch.full((num_classes,), REALIGN_NORM))
        self.register_buffer("allowed", torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.g_aux.weight
        lengths = torch.linalg.vector_norm(weight, dim=1)
        scale = torch.where(self.row_norm > 0, self.row_norm / lengths.clamp_min(1e-12), torch.ones_like(lengths))
        logits = F.linear(x, weight * scale[:, None], self.g_aux.bias)
        return logits.masked_fill(self.allowed == 0, torch.finfo(logits.dtype).min)

    def sse_logits(self, x: torch.Tensor) -> torch.Tensor:
        """SSE-C's logits: what the backbone trains through."""
        return F.linear(x, self.sse, self.sse_bias)

    @torch.no_grad()
    def personalize(self, l_head: nn.Linear, counts: np.ndarray) -> None:
        """Become the client's personalised head (module docstring)."""
        weight, bias = personal_head(self.g_aux, l_head)
        self.g_aux.weight.copy_(weight)
        self.g_aux.bias.copy_(bias)
        self.row_norm.zero_()
        self.allowed.copy_(torch.as_tensor(np.asarray(counts) > 0, dtype=self.allowed.dtype))


class ClientStep(nn.Module):
    """The model as a FedLoGe client trains it: the forward gives SSE-C's logits of the features (the backbone's
    only gradient) and keeps g_aux's logits of the detached features in `aux` for `client_loss`. Its parameters
    are the model's, so one SGD over them is their separate optimisers with the same settings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.embed(x)
        head = self.model.classifier
        self.aux = head.g_aux(features.detach())
        return head.sse_logits(features)


def client_loss(logits: torch.Tensor, labels: torch.Tensor, step: ClientStep, loss_fn: LossFn) -> torch.Tensor:
    """The client's loss on SSE-C's logits plus g_aux's cross-entropy (their `update_weights_gaux`: separate
    backward passes, summed here since no parameter gets a gradient from both)."""
    return loss_fn(logits, labels) + F.cross_entropy(step.aux, labels)


def client_objective(model: nn.Module, loss_fn: LossFn) -> tuple[nn.Module, LossFn]:
    """What a FedLoGe client hands `flcore.training.train`: the model as `ClientStep`, and its loss. A model whose
    SSE-C is still zeros (not the server's global model) is refused: its backbone would get no gradient."""
    if not bool(model.classifier.sse.any()):
        raise ValueError(
            "the model's SSE-C is all zeros: FedLoGe's clients train the server's global model, which has it"
        )
    step = ClientStep(model)
    return step, lambda logits, labels: client_loss(logits, labels, step, loss_fn)

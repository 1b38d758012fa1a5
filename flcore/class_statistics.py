"""The client half of CCVR and CReFF: class statistics of the received global model, and their encoding.

CCVR's clients send per-class feature means and covariances (`feature_statistics`), CReFF's per-class
classifier gradients (`drawn_class_gradients`: CReFF's 10 draws of up to 32 images per class, each augmented
with DSA, `flcore.dsa`); the server halves are `strategies.ccvr` and `strategies.creff`.
CReFF asks for an upload by putting `upload = <name>` (and its re-trained classifier) in the round's train
config, and the client computes it on the received model before training; CCVR sends the final
aggregated model in a `query.upload` message with `upload = <name>` in its config, and the client computes
the upload on that model without training. Either way the client answers with an extra ConfigRecord
`uploads` of `.npy` bytes.
This lives in the shared package because the client must never import the server's `strategies`.
Classifier-input features are `FLModel.embed` (the classifier's input: the projection output, or the backbone's
features with `head=none`), computed on the model's device in float32 (statistics in float64, with no mixed
precision), and sent from the CPU.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from torch import nn

from flcore.arrays import read_npy
from flcore.batches import Batches
from flcore.dsa import augment

UPLOAD_KEY = "upload"  # train-config key naming the requested upload
HEAD_KEYS = {"weight": "upload-head-weight", "bias": "upload-head-bias"}  # classifier the upload is computed with
RECORD = "uploads"  # reply ConfigRecord holding it
UPLOAD_ACTION = "upload"  # the ClientApp's query action for an upload without training: `query.upload`

REAL_DRAWS, REAL_BATCH = 10, 32  # CReFF's client: 10 draws of `batch_real` images per class for its gradients

Uploads = dict[str, np.ndarray]


@dataclass(frozen=True)
class UploadRequest:
    """What an upload may use besides the model and the data: the classifier the server sent (CReFF), and for
    CReFF's class draws the client's seeded generator and whether they are augmented (`creff-dsa`)."""

    head: Mapping[str, torch.Tensor] | None = None
    gen: torch.Generator | None = None
    dsa: bool = False


def encode(arrays: Mapping[str, np.ndarray]) -> ConfigRecord:
    """Arrays as `.npy` bytes in a ConfigRecord (Flower allows one ArrayRecord per reply: the model's)."""
    return ConfigRecord({key: npy_bytes(value) for key, value in arrays.items()})


def decode(record: ConfigRecord) -> Uploads:
    """The arrays of an upload (or of the server's head); `ArrayProblem` if one is not finite numeric `.npy`."""
    return {k: read_npy(k, v) for k, v in record.items()}


def npy_bytes(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(value), allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def class_features(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-input features of every local image under the model as received (eval mode), and labels."""
    model.eval()
    feats, labels = [], []
    for x, y in batches.iterate():
        feats.append(model.embed(x).double())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def feature_statistics(
    model: nn.Module, batches: Batches, num_classes: int, request: UploadRequest | None = None
) -> dict[str, np.ndarray]:
    """CCVR's client upload: per-class count, mean [C, D] and covariance [C, D, D] (zeros where absent)."""
    feats, labels = class_features(model, batches)
    dim = feats.shape[1]
    counts = np.zeros(num_classes)
    means, covs = np.zeros((num_classes, dim), np.float32), np.zeros((num_classes, dim, dim), np.float32)
    for c in range(num_classes):
        fc = feats[labels == c]
        counts[c] = len(fc)
        if len(fc):
            means[c] = fc.mean(0).cpu().numpy()
        if len(fc) > 1:
            covs[c] = torch.cov(fc.T).cpu().numpy()
    return {"counts": counts, "means": means, "covs": covs}


def drawn_class_gradients(
    model: nn.Module, batches: Batches, num_classes: int, request: UploadRequest | None = None
) -> dict[str, np.ndarray]:
    """CReFF's client upload, as its `compute_gradient`: per class, the mean-CE gradient of a classifier on the
    features of up to `REAL_BATCH` of the class's images drawn without replacement, averaged over `REAL_DRAWS`
    draws; each draw is augmented by one siamese DSA transform (`flcore.dsa`) when `request.dsa` is on.

    The classifier is the server's (`request.head`, sent with the request, as in CReFF) on the received backbone
    in eval mode; without one, the received model's own. Draws and augmentations come from `request.gen`, class
    by class in ascending order within each draw.
    """
    request = request or UploadRequest()
    gen = request.gen if request.gen is not None else torch.Generator().manual_seed(0)
    model.eval()
    own = {"weight": model.classifier.weight, "bias": model.classifier.bias}
    source = request.head if request.head is not None else own
    device = next(model.parameters()).device
    weight, bias = (source[k].detach().to(device, torch.float64) for k in ("weight", "bias"))
    labels = np.asarray(batches.data.labels)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    grad_w = np.zeros((num_classes, *weight.shape), np.float64)
    grad_b = np.zeros((num_classes, *bias.shape), np.float64)
    members = {c: np.flatnonzero(labels == c) for c in np.flatnonzero(counts)}
    for _ in range(REAL_DRAWS):
        for c, rows in members.items():
            x = batches.take(rows[torch.randperm(len(rows), generator=gen)[:REAL_BATCH].numpy()])
            if request.dsa:
                x = augment(x, gen)
            with torch.no_grad():
                feats = model.embed(x).double()
            gw, gb = classifier_grad(feats, int(c), weight, bias, create_graph=False)
            grad_w[c] += gw.cpu().numpy() / REAL_DRAWS
            grad_b[c] += gb.cpu().numpy() / REAL_DRAWS
    return {"counts": counts, "grad-weight": grad_w.astype(np.float32), "grad-bias": grad_b.astype(np.float32)}


def classifier_grad(
    feats: torch.Tensor, label: int, weight: torch.Tensor, bias: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = weight.detach().requires_grad_(True), bias.detach().requires_grad_(True)
    target = torch.full((len(feats),), label, dtype=torch.long, device=feats.device)
    loss = F.cross_entropy(F.linear(feats, w, b), target)
    gw, gb = torch.autograd.grad(loss, (w, b), create_graph=create_graph)
    return gw, gb


# upload name -> fn(model, batches, num_classes, request) -> arrays to send.
CLIENT_UPLOADS: dict[str, Callable] = {"feature-stats": feature_statistics, "class-gradients": drawn_class_gradients}


def upload_bytes(name: str, num_classes: int, dim: int) -> int:
    """Bytes of one client's upload `name` (float32 arrays, float64 counts, `.npy` headers), known in advance so
    the preflight can check it against the server's `max-upload-mb`."""
    c, d = num_classes, dim
    floats = {"feature-stats": c * d + c * d * d, "class-gradients": c * c * d + c * c}[name]
    return 4 * floats + 8 * c + 3 * 128


def client_upload(
    server_config: Mapping,
    model: torch.nn.Module,
    batches,
    num_classes: int,
    gen: torch.Generator | None = None,
    dsa: bool = False,
) -> ConfigRecord:
    """What a client sends when the server's round config asks for an upload (and maybe sends a classifier);
    `gen` and `dsa` are for CReFF's class draws (`drawn_class_gradients`)."""
    name = str(server_config[UPLOAD_KEY])
    if name not in CLIENT_UPLOADS:
        raise ValueError(f"server asked for upload {name!r}; this client knows {', '.join(CLIENT_UPLOADS)}")
    head = None
    if HEAD_KEYS["weight"] in server_config:
        head = {k: torch.from_numpy(read_npy(v, server_config[v])) for k, v in HEAD_KEYS.items()}
    return encode(CLIENT_UPLOADS[name](model, batches, num_classes, UploadRequest(head, gen, dsa)))

"""The client half of CLIP2FL: distillation from a CLIP teacher run on the client's own images.

The server asks for it by putting `kd-weight` and `kd-temperature` in the round's train config
(strategy=clip2fl). The client then adds weight * KL(softmax(q/T) || softmax(p/T)) * T^2 to its loss,
where q are the CLIP teacher's zero-shot logits of the same (unaugmented) image and p the student's,
as CLIP2FL's reference code does (T = 3, prompt `clip2fl-prompt`: "a photo of a {}" by default). The
teacher (`align-teacher` / `align-pretrained`: tiny random or real local weights; or `holdout`, the
offline stand-in that stage 3 uses too, so `clip2fl` and `ours` can be compared with teachers of equal
knowledge) runs once per process over the partition, on the client's device; its logits are cached, not
recomputed each round. open_clip is imported only here, and the ClientApp imports this module lazily.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from flcore.config import Settings
from flcore.datasets import ImageSet
from flcore.device import compute_of
from flcore.losses import kd_loss
from flcore.training import ExtraLoss

WEIGHT_KEY, TEMPERATURE_KEY = "kd-weight", "kd-temperature"  # train-config keys that switch distillation on


_CACHE: dict[tuple, torch.Tensor] = {}  # (data split, partition, images, teacher) -> logits, least recently used first
CACHED_PARTITIONS = 64  # as many as a process keeps client data for (`flcore.run_data`): with 1,000 clients an
# actor serves many partitions, each rarely, and keeping all would grow with the clients it ever served


TEACHER_KEYS = (
    "align-teacher",
    "align-pretrained",
    "projection-dim",
    "clip2fl-prompt",
    "holdout-model",
    "holdout-epochs",
    "holdout-lr",
)


def _fingerprint(images: ImageSet) -> tuple:
    """What the cached logits belong to: a node holding its own data may add or remove images between rounds."""
    return (len(images), hash(images.files)) if images.files is not None else (len(images),)


def teacher_logits(cfg: Settings, partition_id: int, classes: tuple, images: ImageSet) -> torch.Tensor:
    """The teacher's logits [N, C] of this client's data, computed once per process and reused while it is
    among the last `CACHED_PARTITIONS` partitions the process served."""
    key = (cfg.data_key, partition_id, _fingerprint(images), *(cfg[k] for k in TEACHER_KEYS))
    if key in _CACHE:
        _CACHE[key] = _CACHE.pop(key)
        return _CACHE[key]
    compute = _holdout_logits if cfg.holdout_teacher else _clip_logits
    _CACHE[key] = compute(cfg, partition_id, classes, images)
    while len(_CACHE) > CACHED_PARTITIONS:
        del _CACHE[next(iter(_CACHE))]
    return _CACHE[key]


def _clip_logits(cfg: Settings, partition_id: int, classes: tuple, images: ImageSet) -> torch.Tensor:
    """CLIP's zero-shot logits, as CLIP2FL's clients compute them."""
    from alignment import teacher as clip

    config_dir = Path(tempfile.gettempdir()) / "clip2fl-configs"
    dim = cfg.projection_dim
    device = compute_of(cfg).device
    model = clip.load_teacher(cfg.align_teacher, cfg.align_pretrained, dim, config_dir, device)
    print(f"[clip2fl] client {partition_id} computes teacher logits once with {model.label}", flush=True)
    return clip.zero_shot_logits(model, classes, images, clip.prompt_templates(cfg.clip2fl_prompt))


def _holdout_logits(cfg: Settings, partition_id: int, classes: tuple, images: ImageSet) -> torch.Tensor:
    """The offline stand-in for CLIP (`alignment.holdout`), the same one stage 3 uses: loaded from the server's
    cache where it shares a disk with the server (simulation), else trained here with the same seed."""
    from alignment import holdout

    model, source = holdout.load_or_train(cfg)
    print(f"[clip2fl] client {partition_id} computes teacher logits once with the {source}", flush=True)
    return holdout.logits(cfg, model, images)


def distillation(
    cfg: Settings, server_config: Mapping, partition_id: int, classes: tuple, images: ImageSet
) -> ExtraLoss:
    """The extra loss term `train` adds: weighted, temperature-scaled KD towards the cached teacher logits."""
    weight, temperature = float(server_config[WEIGHT_KEY]), float(server_config[TEMPERATURE_KEY])
    if weight < 0 or temperature <= 0:
        raise ValueError(f"kd-weight = {weight} must be >= 0 and kd-temperature = {temperature} must be > 0.")
    q = teacher_logits(cfg, partition_id, classes, images).to(compute_of(cfg).device)
    if q.shape != (len(images), len(classes)):
        raise RuntimeError(
            f"teacher logits {tuple(q.shape)} do not match the partition ({len(images)}, {len(classes)})"
        )

    def term(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return weight * kd_loss(logits, q[idx], temperature)

    return term

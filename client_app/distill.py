"""The client half of CLIP2FL: distillation from a CLIP teacher run on the client's own images.

The server asks for it by putting `kd-weight` and `kd-temperature` in the round's train config
(strategy=clip2fl). The client then adds weight * KL(softmax(q/T) || softmax(p/T)) * T^2 to its loss,
where q are the CLIP teacher's zero-shot logits of the same (unaugmented) image and p the student's,
as CLIP2FL's reference code does (T = 3, prompt `clip2fl-prompt`: "a photo of a {}" by default). The
teacher (`align-teacher` / `align-pretrained`: tiny random or real local weights) runs once per process
over the partition; its logits are cached, not recomputed each round. open_clip is imported only here,
and the ClientApp imports this module lazily.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from flcore.config import data_key
from flcore.data import ImageSet
from flcore.losses import kd_loss
from flcore.training import ExtraLoss

WEIGHT_KEY, TEMPERATURE_KEY = "kd-weight", "kd-temperature"  # train-config keys that switch distillation on


_CACHE: dict[tuple, torch.Tensor] = {}  # (data split, partition, teacher) -> logits; one process, many rounds


def teacher_logits(cfg: Mapping, partition_id: int, classes: tuple, images: ImageSet) -> torch.Tensor:
    """Zero-shot CLIP logits [N, C] of this client's partition, computed once per process and reused."""
    teacher, pretrained, prompt = str(cfg["align-teacher"]), str(cfg["align-pretrained"]), str(cfg["clip2fl-prompt"])
    key = (data_key(cfg), partition_id, teacher, pretrained, int(cfg["projection-dim"]), prompt)
    if key not in _CACHE:
        from alignment import teacher as clip

        config_dir = Path(tempfile.gettempdir()) / "clip2fl-configs"
        model = clip.load_teacher(teacher, pretrained, int(cfg["projection-dim"]), config_dir)
        print(f"[clip2fl] client {partition_id} computes teacher logits once with {model.label}", flush=True)
        _CACHE[key] = clip.zero_shot_logits(model, classes, images, clip.prompt_templates(prompt))
    return _CACHE[key]


def distillation(
    cfg: Mapping, server_config: Mapping, partition_id: int, classes: tuple, images: ImageSet
) -> ExtraLoss:
    """The extra loss term `train` adds: weighted, temperature-scaled KD towards the cached teacher logits."""
    weight, temperature = float(server_config[WEIGHT_KEY]), float(server_config[TEMPERATURE_KEY])
    if weight < 0 or temperature <= 0:
        raise ValueError(f"kd-weight = {weight} must be >= 0 and kd-temperature = {temperature} must be > 0.")
    q = teacher_logits(cfg, partition_id, classes, images)
    if q.shape != (len(images), len(classes)):
        raise RuntimeError(
            f"teacher logits {tuple(q.shape)} do not match the partition ({len(images)}, {len(classes)})"
        )

    def term(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return weight * kd_loss(logits, q[idx], temperature)

    return term

"""The teacher's logits q on D_align: read from a file computed elsewhere, or computed once and cached.

The teacher runs at most once per (teacher, data, D_align) across rounds and reruns: its logits on
D_align and on the test split (for its own zero-shot accuracy) are cached under
`<output-dir>/teacher-cache`. A random teacher (`tiny`) carries no knowledge, so `effective_beta` turns
the KL term off for it and says why. The offline stand-in `holdout` (`alignment.holdout`) does carry
knowledge, and keeps its beta.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flcore.config import ConfigError, Settings
from flcore.datasets import Dataset, ImageSet
from flcore.device import compute_of
from flcore.files import atomic_write
from flcore.memory import check_teacher_fits

PLACEHOLDER_NAME = re.compile(r"^(class[ _-]?)?\d+$", re.IGNORECASE)


@dataclass
class TeacherLogits:
    """q for D_align, where it came from, and the teacher's own zero-shot test accuracy (None if unknown)."""

    align: torch.Tensor
    source: str
    random: bool
    test_accuracy: float | None


def check_class_names(
    classes: Sequence[str], who: str = "align = true", escape: str = ", or pass align-logits-file"
) -> None:
    """CLIP prompts need real class names: placeholders ('class 3', '17'), blanks or duplicates are errors.

    `who` names the setting that prompts CLIP, `escape` the way around it (if any) for the message.
    """
    if not classes or any(not str(c).strip() for c in classes) or len(set(classes)) != len(classes):
        raise ConfigError(
            f"{who} needs distinct, non-empty class names for the CLIP prompts; got {list(classes)[:5]}..."
        )
    if all(PLACEHOLDER_NAME.match(str(c).strip()) for c in classes):
        raise ConfigError(
            f"{who}: the dataset's class names are missing (got placeholders like {classes[0]!r}); the CLIP "
            f"teacher prompts with class names. Put a classnames.txt (one name per line) in data-dir{escape}."
        )


def load_logits_file(
    path: str, align_idx: np.ndarray, classes: Sequence[str], test_labels: np.ndarray
) -> TeacherLogits:
    """Logits computed elsewhere: a .npy [|D_align|, C] array, or a .pt tensor or dict.

    A dict holds `logits` and optionally `classes` (must equal the dataset's), `indices` (must equal
    D_align's indices into its source, the training split unless `align-data` names another) and
    `test-logits` (for the teacher's test accuracy).
    """
    key, file = "align-logits-file", Path(path).expanduser()
    if file.suffix not in (".npy", ".pt"):
        raise ConfigError(f"run-config key '{key}' = {path!r}: expected a .npy or .pt file.")
    try:
        if file.suffix == ".npy":
            obj: dict = {"logits": np.load(file, allow_pickle=False)}
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            obj = loaded if isinstance(loaded, dict) else {"logits": loaded}
        if "logits" not in obj:
            raise ConfigError(f"run-config key '{key}' = {path!r}: the dict has no 'logits' entry.")
        logits = torch.as_tensor(np.asarray(obj["logits"], dtype=np.float32))
    except ConfigError:
        raise
    except Exception as err:  # a truncated, foreign or non-numeric file: name it, whatever the reader raised
        raise ConfigError(f"run-config key '{key}' = {path!r} cannot be read as numeric logits: {err}") from err
    want = (len(align_idx), len(classes))
    if tuple(logits.shape) != want:
        raise ConfigError(
            f"run-config key '{key}' = {path!r} holds logits of shape {tuple(logits.shape)}: expected {want} "
            f"(|D_align| = {want[0]} images x {want[1]} classes)."
        )
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise ConfigError(
            f"run-config key '{key}' = {path!r}: {bad} of its {logits.numel()} logits are NaN or Inf; expected finite "
            "numbers."
        )
    if "classes" in obj and [str(c) for c in obj["classes"]] != [str(c) for c in classes]:
        raise ConfigError(
            f"run-config key '{key}' = {path!r}: its classes {list(obj['classes'])[:5]}... do not match the "
            f"dataset's {list(classes)[:5]}..."
        )
    if "indices" in obj and not np.array_equal(np.asarray(obj["indices"]), align_idx):
        raise ConfigError(f"run-config key '{key}' = {path!r}: its indices are not this run's D_align.")
    test = obj.get("test-logits")
    acc = None
    if test is not None and len(test) == len(test_labels):
        acc = float((np.asarray(test).argmax(1) == test_labels).mean())
    return TeacherLogits(logits, f"file {file}", False, acc)


def teacher_embed_dim(cfg: Settings) -> int:
    """The teacher's feature size without loading it (tiny is built at projection-dim)."""
    import open_clip

    name = cfg.align_teacher
    if name == "tiny":
        return cfg.projection_dim
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ConfigError(
            f"run-config key 'align-teacher' = {name!r} is not allowed: expected tiny or an open_clip model name "
            "(open_clip.list_models()), e.g. 'ViT-L-14-336'."
        )
    return int(model_cfg["embed_dim"])


def check_teacher(cfg: Settings, use: str) -> None:
    """The align-teacher's embedding size must be `projection-dim` (`use` says why), and a real teacher's
    weights must be on this machine; the tiny teacher is built at projection-dim."""
    dim = teacher_embed_dim(cfg)
    if dim != cfg.projection_dim:
        raise ConfigError(
            f"run-config key 'projection-dim' = {cfg.projection_dim} does not match the align-teacher "
            f"{cfg.align_teacher}'s embedding size {dim}: {use}; set projection-dim={dim}."
        )
    if cfg.align_teacher != "tiny":
        from alignment.teacher import clip_parameters, resolve_weights

        name = cfg.align_teacher
        resolve_weights(name, cfg.align_pretrained)
        check_teacher_fits("align-teacher", name, clip_parameters(name), torch.float32, compute_of(cfg).device)


def _cache_key(cfg: Settings, align_idx: np.ndarray, split: str) -> str:
    from alignment.teacher import TEMPLATES, TINY_SEED, tiny_config

    name, pretrained = cfg.align_teacher, cfg.align_pretrained
    weights = Path(pretrained).expanduser()
    teacher = (
        {"tiny": tiny_config(cfg.projection_dim), "seed": TINY_SEED}
        if name == "tiny"
        else {"name": name, "pretrained": pretrained, "bytes": weights.stat().st_size if weights.is_file() else None}
    )
    data = {**{k: cfg[k] for k in ("dataset", "data-dir", "image-size")}, "align-data": cfg.align_source}
    body = json.dumps({"teacher": teacher, "data": data, "split": split, "templates": len(TEMPLATES)}, sort_keys=True)
    digest = hashlib.sha256(body.encode() + np.ascontiguousarray(align_idx, dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


def holdout_teacher_logits(cfg: Settings, dataset: Dataset, align: ImageSet) -> TeacherLogits:
    """q from the offline stand-in: its logits on D_align, and its own accuracy on the test split."""
    from alignment import holdout

    model, source = holdout.load_or_train(cfg)
    accuracy, _ = holdout.accuracy_on_test_split(cfg, model, dataset)
    return TeacherLogits(holdout.logits(cfg, model, align), source, False, accuracy)


def compute_teacher_logits(cfg: Settings, dataset: Dataset, align: ImageSet, align_idx: np.ndarray) -> TeacherLogits:
    """q for D_align and test logits, from the disk cache or by one teacher forward over each set."""
    from alignment import teacher as clip

    if cfg.holdout_teacher:
        return holdout_teacher_logits(cfg, dataset, align)

    cache = Path(cfg.output_dir).expanduser() / "teacher-cache"
    files = {split: cache / f"{_cache_key(cfg, align_idx, split)}.pt" for split in ("align", "test")}
    random_teacher = cfg.align_teacher == "tiny"
    source = (
        "tiny open_clip config with RANDOM weights (no knowledge)"
        if random_teacher
        else f"{cfg.align_teacher} / {cfg.align_pretrained}"
    )
    if not all(f.is_file() for f in files.values()):
        name, pretrained, dim = cfg.align_teacher, cfg.align_pretrained, cfg.projection_dim
        model = clip.load_teacher(name, pretrained, dim, cache / "configs", compute_of(cfg).device)
        print(f"[align] computing teacher logits once with {model.label}", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        for split, images in (("align", align), ("test", dataset.test)):
            logits = clip.zero_shot_logits(model, dataset.classes, images)
            atomic_write(files[split], lambda tmp, logits=logits: torch.save(logits, tmp))
    q = torch.load(files["align"], weights_only=True)
    test = torch.load(files["test"], weights_only=True)
    acc = float((test.argmax(1).numpy() == dataset.test.labels).mean())
    return TeacherLogits(q, source, random_teacher, acc)


def effective_beta(cfg: Settings, random_teacher: bool) -> tuple[float, str]:
    """The beta the loss uses, and why it differs from `align-beta` (empty when it does not)."""
    beta, loss = cfg.align_beta, cfg.align_loss
    if loss == "kl" and (random_teacher or beta == 0):
        raise ConfigError(
            f"run-config key 'align-loss' = 'kl' has nothing to learn from: align-beta = {beta} and the teacher is "
            f"{'tiny with random weights' if random_teacher else 'unused'}; use a real teacher or align-logits-file "
            "with align-beta > 0."
        )
    if loss == "ce":
        return 0.0, "align-loss = ce (ablation: CE only)"
    if random_teacher and beta > 0:
        return 0.0, (
            "the tiny teacher has random weights and carries no knowledge, so beta is 0 and alignment is CE "
            "fine-tuning on D_align; use align-teacher=ViT-L-14-336 with local weights or align-logits-file"
        )
    return beta, ""

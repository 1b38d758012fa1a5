"""Per-epoch checkpoints of Dynamic Weighted Pretraining and the cache of its final result.

A run's folder is `<cache-dir>/<key>/`, where the key hashes (teacher, data, config): an interrupted run
with the same settings resumes from its last finished epoch (g_fl, optimizer and lr-schedule state), and
a finished one is reused as is (`final.pt`) instead of pretraining again. Files are written to a temp
name and renamed, so a crash never leaves a half-written checkpoint. They hold tensors and plain values
only and are read with `torch.load(weights_only=True)`, so a planted file cannot run code; a result
that trained zero steps is never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flcore.files import atomic_write, write_json


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (the annotation file identifies the pretraining data)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(teacher: str, data: str, settings: Mapping[str, Any]) -> str:
    """A short stable hash of what determines the pretrained g_fl."""
    blob = json.dumps({"teacher": teacher, "data": data, "settings": dict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Checkpoints:
    """The checkpoint folder of one (teacher, data, config) key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @property
    def final_path(self) -> Path:
        return self.root / "final.pt"

    def save_epoch(self, epoch: int, state: Mapping[str, Any]) -> Path:
        path = self.root / f"epoch-{epoch:03d}.pt"
        _atomic_save({"epoch": epoch, **state}, path)
        return path

    def latest(self) -> dict | None:
        """The newest per-epoch checkpoint, or None when the run has not finished an epoch."""
        files = sorted(self.root.glob("epoch-*.pt"))
        return load(files[-1]) if files else None

    def save_final(self, gfl_state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        _atomic_save({"gfl": dict(gfl_state), "meta": dict(meta)}, self.final_path)
        write_json(self.root / "final.json", dict(meta))
        return self.final_path

    def final(self) -> dict | None:
        """The cached result, or None when there is none or it trained nothing (such a result is never used)."""
        if not self.final_path.is_file():
            return None
        final = load(self.final_path)
        return final if final.get("meta", {}).get("steps", 0) > 0 else None


class CacheError(RuntimeError):
    """A file in the pretraining cache is not one this code wrote; the message names it."""


def load(path: Path) -> dict:
    """A cache file, read with `weights_only=True`: tensors and plain values only, nothing is executed.

    The cache folder may be shared or writable by others; a planted pickle must not run code here.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CacheError(
            f"{path} is not a pretraining checkpoint this code wrote ({type(err).__name__}: {err}); delete it to "
            "pretrain again."
        ) from err
    if not isinstance(payload, dict):
        raise CacheError(f"{path} holds {type(payload).__name__}, not a pretraining checkpoint; delete it.")
    return payload

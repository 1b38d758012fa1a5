"""Image files: which files under a folder are images (`image_files`), and the check before a run starts
that each decodes, within a pixel budget.

A corrupt, empty or decompression-bomb file would otherwise surface mid-run: in `train/` the client
that holds it fails every round (its data is never used, and the run still succeeds), in `test/` the
ServerApp dies at round 0. Sets of up to `DECODE_ALL` files are decoded in full; larger ones (ImageNet-LT)
have a seeded sample of `SAMPLE` files decoded, and every other file is checked when it is read
(`flcore.batches.open_image` names the file that fails).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from flcore.config import ConfigError
from flcore.progress import progress

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
DECODE_ALL = 10_000
SAMPLE = 1_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(root: Path) -> list[Path]:
    """The image files under `root` at any depth (by suffix, any case), sorted; other files are not images."""
    return [path for path in sorted(root.rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]


def image_problem(path: str) -> str | None:
    """Why the file is not a usable image (empty, undecodable, more than MAX_PIXELS pixels), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    return f"has {width} x {height} pixels, more than the budget of {MAX_PIXELS:,}"
                img.load()
    except Exception as err:  # PIL raises many types for broken files; each is a reason to refuse the file
        return f"cannot be decoded ({type(err).__name__}: {err})"
    return None


def files_to_check(files: Sequence[str], seed: int) -> tuple[list[str], str]:
    """All files, or a seeded sample of a large set; and a phrase saying which."""
    if len(files) <= DECODE_ALL:
        return list(files), f"all {len(files)}"
    picked = np.random.default_rng(seed).choice(len(files), SAMPLE, replace=False)
    return [files[i] for i in sorted(picked)], f"a sample of {SAMPLE} of {len(files)} (the rest as they are read)"


def check_images(files: Sequence[str], key: str, seed: int = 0) -> str:
    """ConfigError naming `key` and the first unusable file; otherwise what was checked."""
    chosen, which = files_to_check(files, seed)
    for path in progress(chosen, desc=f"checking {key} images", unit="image"):
        problem = image_problem(path)
        if problem is not None:
            raise ConfigError(f"run-config key '{key}': image '{path}' {problem}; remove or replace it.")
    return which

"""Differentiable siamese augmentation (DSA) of CReFF's and CLIP2FL's client class gradients.

Zhao and Bilen ("Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021) augment the real
images whose gradients synthetic data is matched to; CReFF (Shang et al., IJCAI 2022) and CLIP2FL (Shi et al.,
AAAI 2024) do so on their clients before the classifier gradient of each class (`main.py`, `compute_gradient`,
with `Dataset/param_aug.py`'s `DiffAugment`). Their settings: strategy `color_crop_cutout_flip_scale_rotate`
in mode 'S', which applies ONE of the six transforms per call, and a seed, which makes it siamese: one draw
of the transform's parameters is shared by every image of the batch. The constants are `ParamDiffAug`'s.

Each transform here is a pure function of its parameters (`TRANSFORMS`), so it can be checked against the
authors' code with their parameters; `augment` draws the transform and its parameters from a
`torch.Generator` on the CPU (the authors seed the global RNG from the clock), so a run is reproducible and
the draw is the same on every device. Images are normalised NCHW batches, as the model sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

SCALE = 1.2  # ParamDiffAug.ratio_scale
ROTATE_DEGREES = 15.0  # ratio_rotate
CROP_PAD = 0.125  # ratio_crop_pad
CUTOUT = 0.5  # ratio_cutout
FLIP = 0.5  # prob_flip
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5


def color(x: torch.Tensor, brightness: float, saturation: float, contrast: float) -> torch.Tensor:
    """Brightness, saturation and contrast (each parameter a uniform draw in [0, 1))."""
    x = x + (brightness - 0.5) * BRIGHTNESS
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (saturation * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (contrast + CONTRAST) + mean


def crop_shift(size: int) -> int:
    return int(size * CROP_PAD + 0.5)


def crop(x: torch.Tensor, shift_x: int, shift_y: int) -> torch.Tensor:
    """Translate by whole pixels (rows by `shift_x`, columns by `shift_y`), zeros filling in, as the authors' pad-1
    gather does."""
    h, w = x.shape[2], x.shape[3]
    rows = torch.clamp(torch.arange(h, device=x.device) + shift_x + 1, 0, h + 1)
    cols = torch.clamp(torch.arange(w, device=x.device) + shift_y + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded[:, :, rows][:, :, :, cols]


def cutout_size(size: int) -> int:
    return int(size * CUTOUT + 0.5)


def cutout(x: torch.Tensor, offset_x: int, offset_y: int) -> torch.Tensor:
    """Zero a square of half the image's side centred at (`offset_x`, `offset_y`), clipped to the image."""
    h, w = x.shape[2], x.shape[3]
    ch, cw = cutout_size(h), cutout_size(w)
    rows = torch.clamp(torch.arange(ch, device=x.device) + offset_x - ch // 2, 0, h - 1)
    cols = torch.clamp(torch.arange(cw, device=x.device) + offset_y - cw // 2, 0, w - 1)
    mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
    mask[rows[:, None], cols[None, :]] = 0
    return x * mask


def flip(x: torch.Tensor, draw: float) -> torch.Tensor:
    """Mirror left-right when the draw is below `FLIP`."""
    return x.flip(3) if draw < FLIP else x


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    matrix = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def scale(x: torch.Tensor, draw_x: float, draw_y: float) -> torch.Tensor:
    """Rescale each axis by a factor in [1/1.2, 1.2) (bilinear, zeros outside)."""
    low = 1.0 / SCALE
    sx, sy = draw_x * (SCALE - low) + low, draw_y * (SCALE - low) + low
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def rotate(x: torch.Tensor, draw: float) -> torch.Tensor:
    """Rotate by an angle in [-15, 15) degrees (bilinear, zeros outside)."""
    angle = (draw - 0.5) * 2 * ROTATE_DEGREES / 180 * math.pi
    cos, sin = math.cos(angle), math.sin(angle)
    return _affine(x, [[cos, -sin, 0.0], [sin, cos, 0.0]])


def _uniform(gen: torch.Generator, n: int) -> list[float]:
    return torch.rand(n, generator=gen, dtype=torch.float64).tolist()


def _shifts(gen: torch.Generator, x: torch.Tensor) -> list[int]:
    sx, sy = crop_shift(x.shape[2]), crop_shift(x.shape[3])
    return [int(torch.randint(-sx, sx + 1, (1,), generator=gen)), int(torch.randint(-sy, sy + 1, (1,), generator=gen))]


def _offsets(gen: torch.Generator, x: torch.Tensor) -> list[int]:
    h, w = x.shape[2], x.shape[3]
    high_x, high_y = h + (1 - cutout_size(h) % 2), w + (1 - cutout_size(w) % 2)  # the authors' bounds
    return [int(torch.randint(0, high_x, (1,), generator=gen)), int(torch.randint(0, high_y, (1,), generator=gen))]


# name -> (apply(x, *params), draw(gen, x) -> params), in the order of the authors' strategy string.
TRANSFORMS: dict[str, tuple[Callable[..., torch.Tensor], Callable[[torch.Generator, torch.Tensor], list]]] = {
    "color": (color, lambda gen, x: _uniform(gen, 3)),
    "crop": (crop, _shifts),
    "cutout": (cutout, _offsets),
    "flip": (flip, lambda gen, x: _uniform(gen, 1)),
    "scale": (scale, lambda gen, x: _uniform(gen, 2)),
    "rotate": (rotate, lambda gen, x: _uniform(gen, 1)),
}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One siamese DSA draw: a transform picked uniformly from `TRANSFORMS`, its parameters shared by the batch."""
    names = list(TRANSFORMS)
    apply, draw = TRANSFORMS[names[int(torch.randint(len(names), (1,), generator=gen))]]
    return apply(x, *draw(gen, x)).contiguous(memory_format=torch.channels_last)

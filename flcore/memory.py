"""The memory one training process needs for a setting, estimated before anything is allocated.

A setting such as `projection-dim=100000000` (a d x d projection: 10**16 weights) or `image-size=1024
model=resnet50` (about 2.5 GB of activations per image, and 11 GB of digits decoded at that size) would
otherwise fail deep inside a ServerApp or a Ray worker with a MemoryError, or take the machine down. The model
is built on PyTorch's `meta` device (shapes only, no storage) and run forward once there to count its
parameters and the activations a training batch keeps for backward; the dataset a process decodes is sized
from its image count (`data_bytes`), before it is decoded. Both together are checked against the machine's
physical memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from flcore.config import SCHEMA, ConfigError, Settings
from flcore.datasets import IN_MEMORY_IMAGES, RESIZE_CHUNK_BYTES
from flcore.models import PAPER_HEAD, build_model, model_head

FLOAT_BYTES = 4
# Weights, gradients, the SGD momentum buffer and the received global copy (FedProx, CReFF) per parameter.
PARAMETER_COPIES = 4
TEACHER_OVERHEAD = 0.05  # a frozen teacher's share beyond its weights (activations of one batch, device context)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training process: parameter copies, and activations kept for one batch's backward."""

    parameters: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters * FLOAT_BYTES * PARAMETER_COPIES + self.activations * FLOAT_BYTES


def estimate(
    model_name: str, projection_dim: int, num_classes: int, image_size: int, batch: int, head: str = PAPER_HEAD
) -> MemoryEstimate:
    """Parameters and saved activations (both counted in floats) of one training step, from a meta-device model."""
    with torch.device("meta"):
        model = build_model(model_name, projection_dim, num_classes, head=head)
    saved = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal saved
        if isinstance(output, torch.Tensor):
            saved += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model(torch.empty(batch, 3, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return MemoryEstimate(sum(p.numel() for p in model.parameters()), saved)


def physical_memory() -> int:
    """Bytes of RAM on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device: torch.device) -> int:
    """Bytes the run's device has: a GPU's total memory, or this machine's RAM for the CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else physical_memory()


def teacher_bytes(parameters: int, dtype: torch.dtype) -> int:
    """Bytes a frozen teacher of `parameters` holds in `dtype`: its weights, and `TEACHER_OVERHEAD` on top for the
    batch's activations through it (no gradients, no optimizer state) and the device's own context."""
    return round(parameters * dtype.itemsize * (1 + TEACHER_OVERHEAD))


def check_teacher_fits(
    key: str, value: object, parameters: int, dtype: torch.dtype, device: torch.device, available: int | None = None
) -> int:
    """Refuse a frozen teacher that the run's device cannot hold, naming its key; returns the bytes it needs."""
    need = teacher_bytes(parameters, dtype)
    available = device_memory(device) if available is None else available
    if need > available:
        precision = str(dtype).removeprefix("torch.")
        raise ConfigError(
            f"run-config key '{key}' = {value!r} is not allowed here: its {parameters:,} parameters in {precision} "
            f"need about {need / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB of {device}; run "
            "this stage on a device that holds it (a GPU; amp=bf16 halves float32's need where the stage uses amp)."
        )
    return need


def estimate_at(cfg: Settings, num_classes: int, batch: int, head: str) -> MemoryEstimate:
    """`estimate` for the run's model and image size at `batch` images."""
    return estimate(cfg.model, cfg.projection_dim, num_classes, cfg.image_size, batch, head)


def batch_key(cfg: Settings) -> str:
    """The key whose batch the memory check sizes a step by: the larger of local training's and alignment's."""
    return "align-batch-size" if cfg.align_batch_size > cfg.batch_size else "batch-size"


def data_bytes(cfg: Settings) -> int:
    """Bytes a process holds while it decodes the run's dataset at `image-size` (uint8, 3 channels: the images of
    `IN_MEMORY_IMAGES`), plus the one chunk `resize` works on. Known from the dataset's name alone, so it is
    checked before anything is decoded; 0 for datasets read from files on demand."""
    images = IN_MEMORY_IMAGES.get(cfg.dataset, 0)
    return images * 3 * cfg.image_size**2 + (RESIZE_CHUNK_BYTES if images else 0)


def check_memory(cfg: Settings, num_classes: int, available: int | None = None, held: int = 0) -> MemoryEstimate:
    """Refuse a setting one training process could not hold in this machine's memory beside the `held` bytes of
    decoded data (`data_bytes`), naming the key to change."""
    batch = cfg[batch_key(cfg)]
    head = model_head(cfg)
    need = estimate_at(cfg, num_classes, batch, head)
    available = physical_memory() if available is None else available
    if held + need.total <= available:
        return need
    weights = need.parameters * FLOAT_BYTES * PARAMETER_COPIES
    key = "projection-dim" if weights > need.activations * FLOAT_BYTES and head != "none" else "image-size"
    usual = min(batch, int(SCHEMA["batch-size"].default))
    fits = held + estimate_at(cfg, num_classes, usual, head).total <= available
    if key == "image-size" and batch > usual and fits:
        key = batch_key(cfg)  # the default batch fits at this image size: the batch is what does not
    data = f"; the {cfg['dataset']} images decoded at this size hold {held / 2**30:,.1f} GiB besides" if held else ""
    raise ConfigError(
        f"run-config key '{key}' = {cfg[key]!r} is not allowed here: model={cfg.model}, head={head}, image-size="
        f"{cfg.image_size}, projection-dim={cfg.projection_dim} and batch {batch} need about "
        f"{need.total / 2**30:,.1f} GiB per training process ({need.parameters:,} parameters: "
        f"{weights / 2**30:,.1f} GiB with gradients and optimizer state; {need.activations * FLOAT_BYTES / 2**30:,.1f}"
        f" GiB of activations){data}, more than this machine's {available / 2**30:,.1f} GiB."
    )

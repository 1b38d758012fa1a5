"""What the device's arithmetic allows: FLOPs of the model per image and the rate of a large matmul.

A measured throughput means little alone; against these two it says how close a loop is to the limit
(images per second x FLOPs per image / matmul FLOP/s). `torch.utils.flop_counter` counts the matmuls and
convolutions of one forward and one training step (forward and backward); elementwise work (batch norm,
activations, the optimizer) is not counted, so a ratio of 1 is out of reach by that much.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from flcore.device import AMP_DTYPES
from flcore.models import build_model


def flops_per_image(model_name: str, projection_dim: int, num_classes: int, image_size: int, batch: int) -> dict:
    """FLOPs of one image through the model: forward alone and a training step (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_name, projection_dim, num_classes, seed=0)
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    forward = counter.get_total_flops() / batch
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.train()(x), y).backward()
    return {"forward": forward, "train": counter.get_total_flops() / batch}


def device_and_dtype(cfg: Mapping) -> tuple[str, torch.dtype]:
    """The device and compute dtype a run uses: its `device` (`auto` picks CUDA when present) and its `amp`
    (`off`: float32; `bf16`, `fp16`: the autocast dtype `flcore.device` uses). Takes any mapping of those keys
    (a run's Settings, or a partial one), each defaulting to the CPU in float32."""
    device = str(cfg.get("device", "cpu"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, AMP_DTYPES.get(str(cfg.get("amp", "off")), torch.float32)


def matmul_flops_per_second(device: str, dtype: torch.dtype, threads: int, n: int, min_seconds: float = 1.0) -> float:
    """FLOP/s of an n x n matmul on `device` in `dtype` (on a CPU with `threads` torch threads).

    Each product is timed alone and the fastest counts: on a machine shared with other jobs, the best of
    many short products is the rate the device reaches when it is free; a mean would measure the others.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync: Callable[[], None] = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        sync()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            tick = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - tick)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(before)


def limit_ratio(images_per_second: float, flops_per_image: float, flops_per_second: float) -> float:
    """Measured images per second over what the matmul rate would allow for this model."""
    return images_per_second * flops_per_image / flops_per_second

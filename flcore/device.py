"""Where and in which precision a process computes: the `device`, `amp` and `num-workers` keys, resolved here.

Every model of a run (client training and evaluation, the server's evaluation, stages 1 and 3, CCVR/CReFF
calibration, the CLIP and holdout teachers, FedDF/FedBE distillation) runs on the device this module
resolves, so no other module asks CUDA anything. `device=auto` takes the GPU this process sees, else the
CPU: a Ray client actor sees exactly the GPU share Ray gave it (`client-resources-num-gpus`), and an actor
given none sees no GPU, so the same setting puts the server on its GPU and the clients on theirs.

Precision: `amp=off` computes in float32 exactly as on the CPU; `bf16` and `fp16` run the forward passes
under `torch.autocast`, and `fp16` scales the loss with a `GradScaler` (bf16 has float32's range and needs
none). Mixed precision exists only on a CUDA device: anywhere else it is a `ConfigError` naming `amp`.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from flcore.config import ConfigError, Settings

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """The resolved compute settings of this process: device, mixed precision and loader processes."""

    device: torch.device
    amp: str = "off"
    workers: int = 0

    def autocast(self) -> AbstractContextManager:
        """The forward passes' precision: nothing changes with amp off."""
        if self.amp == "off":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaler; disabled (a pass-through to `loss.backward` and `opt.step`) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")


CPU = Compute(torch.device("cpu"))


def visible_gpus() -> int:
    """GPUs this process sees (a Ray actor sees only those Ray assigned it)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(value: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device of this process; a GPU it does not see names the key."""
    gpus = visible_gpus()
    if value == "auto":
        return torch.device("cuda", 0) if gpus else torch.device("cpu")
    device = torch.device(value)
    if device.type != "cuda":
        return device
    index = device.index or 0
    if index >= gpus:
        seen = "no GPU" if gpus == 0 else f"{gpus} GPU(s), cuda:0..cuda:{gpus - 1}"
        raise ConfigError(
            f"run-config key 'device' = {value!r} is not allowed on this machine: this process sees {seen} "
            "(torch.cuda.is_available() and CUDA_VISIBLE_DEVICES); expected auto or cpu, or a GPU it sees."
        )
    return torch.device("cuda", index)


def cpu_share() -> int:
    """CPU cores this process may use: its affinity, capped by OMP_NUM_THREADS where set (Ray sets it to an
    actor's `client-resources-num-cpus`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(threads))) if threads.isdigit() and int(threads) > 0 else cores


def loader_workers(value: Any) -> int:
    """`num-workers` as a number of loader processes: `auto` leaves one core of the share to training."""
    return cpu_share() - 1 if value == "auto" else int(value)


@lru_cache(maxsize=8)
def _compute(device: str, amp: str, workers: str) -> Compute:
    resolved = resolve_device(device)
    if amp != "off" and resolved.type != "cuda":
        raise ConfigError(
            f"run-config key 'amp' = {amp!r} is not allowed here: mixed precision runs on a CUDA device and this "
            f"process computes on the CPU (device = {device!r}, GPUs seen: {visible_gpus()}); expected off."
        )
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"run-config key 'amp' = 'bf16' is not allowed on {torch.cuda.get_device_name(resolved)}: it has no "
            "bfloat16 support; expected fp16 or off."
        )
    return Compute(resolved, amp, loader_workers(workers))


def compute_of(cfg: Settings) -> Compute:
    """This process's compute settings for a validated config (resolved once per process and setting)."""
    return _compute(cfg.device, cfg.amp, str(cfg.num_workers))

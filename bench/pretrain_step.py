"""DWP step time and peak memory: alpha < 1 vs alpha = 1, and with vs without frozen-gradient hygiene.

Run: `python -m bench.pretrain_step [--sizes tiny mid] [--steps 5]`, on the random `tiny`/`mid` LLaVA
teachers (random weights; same classes as llava-1.5). Step time (batch decode, forward, backward,
optimizer step) is the median over `--steps` rounds in one process where the cases take turns step by
step, so a busy machine slows them alike. Memory is measured per case in its own child process (so one
case's allocations cannot hide another's peak): the bytes held in `.grad` buffers after backward, and
peak memory of one step, `torch.cuda.max_memory_allocated` on a GPU, else the rise of the process's peak
RSS over its RSS after a warm-up step. Ratios are printed side by side.

Hygiene on = the teacher has requires_grad False and CLIP runs under no_grad (what `pretrain.dwp` does);
off = a naive version where the teacher keeps requires_grad True (gradients are computed and stored for
every frozen weight, though the optimizer never uses them).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import ROOT

CASES = (("alpha=0.5", 0.5, True), ("alpha=1", 1.0, True), ("alpha=0.5 no-hygiene", 0.5, False))
BATCH = {"tiny": 16, "mid": 8}


def _rss_kb() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * (resource.getpagesize() // 1024)


def setup(size: str):
    """The random teacher of `size`, a batch of synthetic LLaVA records, g_fl and its optimizer."""
    import numpy as np
    import torch
    from PIL import Image

    from flcore.device import resolve_device
    from flcore.models import build_model
    from pretrain.dwp import build_gfl
    from pretrain.llava_data import LlavaSamples, Record
    from pretrain.teacher import tiny_teacher

    torch.set_num_threads(1)
    teacher = tiny_teacher(size)
    device = resolve_device("auto")
    teacher.model.to(device)
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    records = []
    for i in range(BATCH[size]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
        turns = (("human", "<image>\nDescribe the following image in detail."), ("gpt", "A small random picture. " * 3))
        records.append(Record(str(i), f"{i}.png", turns))
    data = LlavaSamples(records, root, teacher, 32, (0.5,) * 3, (0.5,) * 3)
    gfl = build_gfl(build_model("resnet8", 16, 10, seed=0), teacher).to(device)
    opt = torch.optim.AdamW(gfl.parameters(), lr=2e-3)
    return teacher, data, gfl, opt, device


def make_step(teacher, data, gfl, opt, device):
    """One DWP optimizer step for a given alpha and hygiene setting (returns its wall time)."""
    import torch

    from pretrain.dwp import freeze, lm_loss, mixed_features

    idx = list(range(len(data)))

    def step(alpha: float, hygiene: bool) -> float:
        freeze(teacher, hygiene=hygiene)
        t = time.perf_counter()
        batch = data.batch(idx, need_clip=alpha < 1)
        batch.fl_pixels = batch.fl_pixels.to(device)
        loss = lm_loss(teacher, mixed_features(teacher, gfl, batch, alpha, hygiene=hygiene), batch)
        opt.zero_grad(set_to_none=True)
        teacher.model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def memory_case(size: str, alpha: float, hygiene: bool) -> dict:
    """Peak memory and gradient buffers of one case, alone in this (child) process."""
    import torch

    teacher, data, gfl, opt, device = setup(size)
    step = make_step(teacher, data, gfl, opt, device)
    step(alpha, hygiene)
    base = _rss_kb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step(alpha, hygiene)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in teacher.model.parameters() if p.grad is not None)
    grads += sum(p.grad.numel() * p.grad.element_size() for p in gfl.parameters() if p.grad is not None)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    )
    return {"grad_mb": grads / 2**20, "peak_mb": peak}


def timing(size: str, steps: int) -> tuple[dict, dict]:
    """Median step time of every case, the cases interleaved step by step so load changes hit all alike."""
    from pretrain.teacher import TINY_NOTE

    teacher, data, gfl, opt, device = setup(size)
    step = make_step(teacher, data, gfl, opt, device)
    times = {name: [] for name, _, _ in CASES}
    for _, alpha, hygiene in CASES:
        step(alpha, hygiene)  # warm-up
    for _ in range(steps):
        for name, alpha, hygiene in CASES:
            times[name].append(step(alpha, hygiene))
    info = {
        "teacher_params_m": sum(p.numel() for p in teacher.model.parameters()) / 1e6,
        "note": TINY_NOTE,
        "device": device.type,
    }
    return {k: statistics.median(v) for k, v in times.items()}, info


def run_child(size: str, alpha: float, hygiene: bool) -> dict:
    args = json.dumps({"size": size, "alpha": alpha, "hygiene": hygiene})
    command = [sys.executable, "-m", "bench.pretrain_step", "--child", args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrain_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(BATCH))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(memory_case(spec["size"], spec["alpha"], spec["hygiene"])))
        return
    for size in args.sizes:
        res = {name: run_child(size, a, h) for name, a, h in CASES}
        step_s, first = timing(size, args.steps)
        for name in res:
            res[name]["step_s"] = step_s[name]
        print(
            f"\n{size} teacher ({first['teacher_params_m']:.1f}M params, batch {BATCH[size]}, {first['device']}); "
            f"{first['note']}"
        )
        print(f"{'case':<22}{'step s':>9}{'peak MB':>10}{'grad MB':>10}")
        for name, r in res.items():
            print(f"{name:<22}{r['step_s']:>9.3f}{r['peak_mb']:>10.1f}{r['grad_mb']:>10.2f}")
        a, b, c = res["alpha=0.5"], res["alpha=1"], res["alpha=0.5 no-hygiene"]
        print(
            f"ratios: step time alpha<1 / alpha=1 = {a['step_s'] / b['step_s']:.2f}x; "
            f"no-hygiene / hygiene: step time {c['step_s'] / a['step_s']:.2f}x, "
            f"peak memory {c['peak_mb'] / max(a['peak_mb'], 1e-9):.2f}x, "
            f"gradient buffers {c['grad_mb'] / max(a['grad_mb'], 1e-9):.1f}x"
        )


if __name__ == "__main__":
    main()

"""DWP step time and peak memory: alpha < 1 vs alpha = 1, and with vs without frozen-gradient hygiene.

Run: `python bench/pretrain_step.py [--sizes tiny mid] [--steps 3]`. Every case runs in its own child
process (so one case's allocations cannot hide another's peak) on the random `tiny`/`mid` LLaVA
teachers (random weights; same classes as llava-1.5). Each child reports the median step time (forward,
backward, optimizer step; after one warm-up step), the bytes held in `.grad` buffers after backward, and
peak memory: `torch.cuda.max_memory_allocated` on a GPU, else the rise of the process's peak RSS over its
RSS after setup. Ratios are printed side by side.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CASES = (("alpha=0.5", 0.5, True), ("alpha=1", 1.0, True), ("alpha=0.5 no-hygiene", 0.5, False))
BATCH = {"tiny": 16, "mid": 8}


def _rss_kb() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * (resource.getpagesize() // 1024)


def one_case(size: str, alpha: float, hygiene: bool, steps: int) -> dict:
    """Measure one case in this process (called in a child)."""
    import numpy as np
    import torch
    from PIL import Image

    from flcore.models import build_model
    from pretrain.dwp import build_gfl, freeze, lm_loss, mixed_features
    from pretrain.llava_data import LlavaSamples, Record
    from pretrain.teacher import TINY_NOTE, tiny_teacher

    torch.set_num_threads(1)
    teacher = tiny_teacher(size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.model.to(device)
    freeze(teacher, hygiene=hygiene)
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    records = []
    for i in range(BATCH[size]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
        turns = (("human", "<image>\nDescribe the following image in detail."), ("gpt", "A small random picture. " * 3))
        records.append(Record(str(i), f"{i}.png", turns))
    data = LlavaSamples(records, root, teacher, 32, (0.5,) * 3, (0.5,) * 3)
    gfl = build_gfl(build_model("resnet8", 16, 10, seed=0).backbone, teacher).to(device)
    opt = torch.optim.AdamW(gfl.parameters(), lr=2e-3)
    idx = list(range(len(records)))

    def step() -> None:
        batch = data.batch(idx, need_clip=alpha < 1)
        batch.fl_pixels = batch.fl_pixels.to(device)
        loss = lm_loss(teacher, mixed_features(teacher, gfl, batch, alpha, hygiene=hygiene), batch)
        opt.zero_grad(set_to_none=True)
        teacher.model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    base = _rss_kb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in teacher.model.parameters() if p.grad is not None)
    grads += sum(p.grad.numel() * p.grad.element_size() for p in gfl.parameters() if p.grad is not None)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    )
    return {
        "step_s": statistics.median(times),
        "grad_mb": grads / 2**20,
        "peak_mb": peak,
        "teacher_params_m": sum(p.numel() for p in teacher.model.parameters()) / 1e6,
        "note": TINY_NOTE,
        "device": device.type,
    }


def run_child(size: str, alpha: float, hygiene: bool, steps: int) -> dict:
    args = json.dumps({"size": size, "alpha": alpha, "hygiene": hygiene, "steps": steps})
    out = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(BATCH))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(one_case(spec["size"], spec["alpha"], spec["hygiene"], spec["steps"])))
        return
    for size in args.sizes:
        res = {name: run_child(size, a, h, args.steps) for name, a, h in CASES}
        first = next(iter(res.values()))
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

"""What stage 3 costs: its parts in this process, its share of a federated round inside one run, and the teacher.

One invocation, three measurements:
1. the teacher's one-time cost: zero-shot logits for D_align and the test split with an empty cache, then
   the same call again (a cache hit, as in every later round and rerun);
2. the stage's parts, timed here on the run's own data and model, on the ServerApp's torch threads
   (`server-threads`), median of `--repeat` calls each: building a model, loading the aggregated weights
   into it, turning weights back into an ArrayRecord, one test-set evaluation, batching D_align alone,
   the fine-tuning (`align-steps` SGD steps), the FLOP/s of evaluation and fine-tuning against a matmul, one
   whole stage call (round 1: no evaluation before aligning). `--cprofile` adds its cProfile listing;
3. a real `flwr run` simulation of the default config with `align=true`, whose metrics.jsonl gives, for each
   round, its wall time (`seconds`) and the parts the server measured inside it: the wait for the clients'
   training (`train-wait-seconds`), the aggregation, every after-aggregation stage together
   (`stage-seconds`: the stage's model loading, fine-tuning, pre-alignment evaluation, last-step figure)
   and the fine-tuning alone (`align-seconds`). Numerator and denominator come from the same rounds of the
   same run, so other load on the machine slows both alike; the load average is printed with them.

Round 1 is reported apart: the ClientApp actors load the dataset in it. The last round is reported apart
too: it always evaluates before alignment and draws the alignment-step figure. Rounds that evaluate before
aligning (`align-eval-every`; by default only the last) cost one test-set pass more.

Usage: python -m bench.align_cost [--rounds 40] [--repeat 5] [--run-config "k=v ..."] [--cprofile]
                                  [--real-architecture]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import MetricRecord

from alignment import teacher as clip_teacher
from alignment.logits import compute_teacher_logits
from alignment.loss import AlignSettings, StepBatches, fine_tune
from alignment.stage import ALIGN_STREAM, alignment_stages
from bench.limits import flops_per_image, matmul_flops_per_second
from bench.runs import LOG, failure, launch_run, run_dirs
from flcore.arrays import load_record, to_record
from flcore.batches import Batches
from flcore.config import Settings
from flcore.datasets import ImageSet
from flcore.models import run_model
from flcore.reports import read_metrics
from flcore.run_config import parse_overrides
from flcore.run_data import prepare
from flcore.seeding import seeded_generator
from flcore.server_data import server_data
from rounds.stage import ServerContext
from server_app import launch
from server_app.app import Evaluator, torch_threads


def teacher_cost(cfg: Settings) -> tuple[float, float]:
    """Seconds for the teacher's logits with an empty cache, then with the cache filled."""
    data = server_data(cfg)
    idx = prepare(cfg).split.align
    times = []
    for _ in range(2):
        start = time.perf_counter()
        compute_teacher_logits(cfg, data.dataset, data.align, idx)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def real_architecture_cost(cfg: Settings) -> float:
    """Seconds for ViT-L-14-336 (random weights, real compute) to produce q for D_align."""
    import open_clip

    data = server_data(cfg)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14-336")
    teacher = clip_teacher.ClipTeacher(
        "ViT-L-14-336", "random", model.eval(), preprocess, open_clip.get_tokenizer("ViT-L-14-336"), 768, True
    )
    start = time.perf_counter()
    clip_teacher.zero_shot_logits(teacher, data.dataset.classes, data.align)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_parts(cfg: Settings, repeat: int, profile: bool) -> dict[str, float]:
    """Each part of one alignment round timed alone here, on the run's data, model and settings."""
    data = server_data(cfg)
    classes = data.dataset.num_classes

    def new_model(seed: int | None = None):  # the ServerApp's factory (server_app.app.run)
        return run_model(cfg, classes, seed=seed)

    evaluator = Evaluator(new_model(), data, None, cfg.eval_every, cfg.num_server_rounds)
    ctx = ServerContext(cfg, data, new_model, evaluator.metrics)
    (stage,) = alignment_stages(cfg, ctx).after_aggregation
    arrays, model = to_record(new_model(seed=1)), new_model()
    settings = AlignSettings.from_config(cfg, 0.0)
    indexed = ImageSet(np.arange(len(data.align)), data.align.images, data.align.files)
    batches = StepBatches(Batches(indexed, data.dataset, cfg.image_size, settings.batch_size), settings.steps)
    gen = seeded_generator(cfg.seed, 1, ALIGN_STREAM)
    q = torch.zeros(len(data.align), classes)
    parts = {
        "build a model": lambda: new_model(),
        "load weights into it": lambda: load_record(model, arrays),
        "weights back to an ArrayRecord": lambda: to_record(model),
        "one test-set evaluation (+ load)": lambda: evaluator.metrics(to_record(model)),
        "batch D_align alone": lambda: list(batches.iterate(True, settings.augment, gen)),
        "fine-tune on D_align": lambda: fine_tune(model, data.align, data.dataset, cfg.image_size, q, settings, gen),
        "whole stage call, round 1": lambda: stage(1, arrays, MetricRecord()),
    }
    times = {name: median_seconds(fn, repeat) for name, fn in parts.items()}
    if profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [stage(1, arrays, MetricRecord()) for _ in range(repeat)])
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return times


def arithmetic(cfg: Settings, times: Mapping) -> None:
    """How close the fine-tuning and the evaluation run to this process's matmul rate (their FLOPs per second)."""
    data, settings = server_data(cfg), AlignSettings.from_config(cfg, 0.0)
    classes, test_size = data.dataset.num_classes, len(data.test.data)
    flops = flops_per_image(cfg.model, cfg.projection_dim, classes, cfg.image_size, 32)
    peak = matmul_flops_per_second("cpu", torch.float32, torch.get_num_threads(), 1024)
    work = {
        "fine-tune on D_align": settings.steps * settings.batch_size * flops["train"],
        "one test-set evaluation (+ load)": test_size * flops["forward"],
    }
    print(f"  matmul rate here ({torch.get_num_threads()} thread(s), float32): {peak / 1e9:.1f} GFLOP/s")
    for name, total in work.items():
        rate = total / times[name]
        print(f"  {name}: {total / 1e9:.2f} GFLOP -> {rate / 1e9:.1f} GFLOP/s = {rate / peak:.0%} of the matmul rate")


def read_rounds(run_dir: Path) -> list[dict]:
    """The trained rounds (1..N) of a run's metrics.jsonl."""
    return [r for r in read_metrics(run_dir) if r["round"] > 0]


def shares(rows: Sequence[Mapping]) -> dict[str, float]:
    """Mean round time and the mean seconds of each measured part, over `rows` (one run's rounds)."""
    keys = ("seconds", "train-wait-seconds", "aggregate-seconds", "stage-seconds", "align-seconds")
    out = {k: sum(float(r.get(k, 0.0)) for r in rows) / len(rows) for k in keys}
    out["pre-align-eval-seconds"] = sum(float(r.get("pre-align-eval-seconds", 0.0)) for r in rows) / len(rows)
    return out


def print_run(rows: Sequence[Mapping], load: tuple[float, float]) -> None:
    """Per-round table, then the stage's share of round 1, the steady rounds, the last round and all rounds."""
    print(f"\nrounds of one run (load average {load[0]:.2f} at its start, {load[1]:.2f} at its end)")
    header = ("round", "seconds", "train-wait", "aggregate", "stage", "fine-tune", "pre-eval")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 8, 10, 9, 7, 9, 8), strict=True)))
    for r in rows:
        print(
            f"{r['round']:>5} {r['seconds']:8.3f} {r['train-wait-seconds']:10.3f} {r['aggregate-seconds']:9.3f} "
            f"{r['stage-seconds']:7.3f} {r['align-seconds']:9.3f} {r.get('pre-align-eval-seconds', 0.0):8.3f}"
        )
    groups = {
        "round 1 (actors load data)": rows[:1],
        "steady (rounds 2..N-1)": rows[1:-1],
        "last round": rows[-1:] if len(rows) > 1 else [],
        "every round": rows,
    }
    for name, group in groups.items():
        if not group:
            continue
        s = shares(group)
        print(
            f"  {name:<27} round {s['seconds']:7.3f} s | stage {s['stage-seconds']:6.3f} s = "
            f"{s['stage-seconds'] / s['seconds']:6.2%} (fine-tune {s['align-seconds'] / s['seconds']:5.2%}, "
            f"pre-align eval {s['pre-align-eval-seconds'] / s['seconds']:5.2%}) | client wait "
            f"{s['train-wait-seconds'] / s['seconds']:6.2%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.align_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40, help="the default run has 40")
    parser.add_argument("--repeat", type=int, default=5, help="calls per part in the in-process timing")
    parser.add_argument("--run-config", default="")
    parser.add_argument("--cprofile", action="store_true", help="print cProfile's listing of the stage call")
    parser.add_argument("--real-architecture", action="store_true")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="align-cost-"))
    overrides = f"align=true num-server-rounds={args.rounds} output-dir={out} {args.run_config}".strip()
    defaults, _ = launch.project_settings()
    cfg, _ = launch.resolve(parse_overrides([overrides]), defaults)
    print(f"torch threads here: {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}", flush=True)

    cold, warm = teacher_cost(cfg)
    print(f"teacher logits ({cfg.align_teacher}): cold {cold:.3f} s, cached {warm:.4f} s", flush=True)
    print(f"\nthe stage's parts in this process (median of {args.repeat}):")
    with torch_threads(cfg.server_threads):  # the ServerApp's threads
        times = stage_parts(cfg, args.repeat, args.cprofile)
        for name, seconds in times.items():
            print(f"  {name:<32} {seconds:8.4f} s")
        arithmetic(cfg, times)
    if args.real_architecture:
        real = real_architecture_cost(cfg)
        print(f"  ViT-L-14-336 q for D_align (random weights, real compute) {real:8.3f} s (once per run)")

    load_start = os.getloadavg()[0]
    print(f"\nrunning {args.rounds} rounds with align=true; log: {out / LOG}", flush=True)
    if not launch_run(out, overrides):
        raise SystemExit(failure(out, "the simulation"))
    rows = read_rounds(run_dirs(out, finished=True)[-1])
    print(f"\nalignment cost on the default config + align=true, {len(rows)} rounds ({cfg.align_teacher} teacher)")
    print_run(rows, (load_start, os.getloadavg()[0]))
    steady = shares(rows[1:-1] or rows)
    print(f"  teacher logits, one time (cold) {cold:8.3f} s = {cold / steady['seconds']:5.2f} steady rounds")


if __name__ == "__main__":
    main()

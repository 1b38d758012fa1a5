"""What stage 3 costs: the share of a federated round that alignment takes, and the teacher's one-time cost.

One run, side by side:
1. the teacher's one-time cost in this process: zero-shot logits for D_align and the test split with an
   empty cache, then the same call again (a cache hit, as in every later round and rerun);
2. a real `flwr run` simulation of the default config with `align=true` for a few rounds (it reuses the
   cache from step 1), whose metrics.jsonl gives each round's wall time (`seconds`: client training,
   aggregation, alignment, evaluation) and the alignment's own time (`align-seconds`) plus the extra
   pre-alignment evaluation (`pre-align-eval-seconds`).

Prints the mean round time, the alignment's share of it (target <= 5 %), and the teacher's one-time cost
as a multiple of a round. The teacher is the offline `tiny` one (random weights) unless overridden;
`--real-architecture` also times ViT-L-14-336 (LLaVA-1.5's CLIP, random weights: same compute as the
real teacher, no download) on D_align.

Usage: python bench/align_cost.py [--rounds 5] [--run-config "k=v ..."] [--real-architecture]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignment import teacher as clip_teacher  # noqa: E402
from alignment.logits import compute_teacher_logits  # noqa: E402
from flcore.experiment import prepare, server_data  # noqa: E402
from server_app import launch  # noqa: E402


def teacher_cost(cfg: dict) -> tuple[float, float]:
    """Seconds for the teacher's logits with an empty cache, then with the cache filled."""
    data = server_data(cfg)
    idx = prepare(cfg).split.align
    times = []
    for _ in range(2):
        start = time.perf_counter()
        compute_teacher_logits(cfg, data.dataset, data.align, idx)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def real_architecture_cost(cfg: dict) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--real-architecture", action="store_true")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="align-cost-"))
    overrides = f"align=true num-server-rounds={args.rounds} output-dir={out} {args.run_config}".strip()
    defaults, _ = launch.project_settings()
    cfg, _ = launch.resolve(launch.parse_overrides([overrides]), defaults)

    cold, warm = teacher_cost(cfg)
    print(f"teacher logits ({cfg['align-teacher']}): cold {cold:.3f} s, cached {warm:.3f} s", flush=True)
    if launch.main(["--run-config", overrides]) != 0:
        raise SystemExit("the simulation failed; see the log above")
    run_dir = next(p for p in out.iterdir() if (p / "metrics.jsonl").is_file())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    round_s = sum(r["seconds"] for r in rows) / len(rows)
    align_s = sum(r["align-seconds"] for r in rows) / len(rows)
    eval_s = sum(r["pre-align-eval-seconds"] for r in rows) / len(rows)

    print(f"\nalignment cost on the default config + align=true, {len(rows)} rounds ({cfg['align-teacher']} teacher)")
    print(f"  mean round wall time                 {round_s:8.3f} s")
    print(f"  alignment fine-tuning per round      {align_s:8.3f} s   share {align_s / round_s:6.1%}  (target <= 5%)")
    print(f"  pre-alignment evaluation per round   {eval_s:8.3f} s   share {eval_s / round_s:6.1%}  (reporting only)")
    print(f"  teacher logits, one time (cold)      {cold:8.3f} s   = {cold / round_s:5.2f} rounds")
    print(f"  teacher logits, cached (warm)        {warm:8.3f} s   = {warm / cold:6.1%} of cold")
    if args.real_architecture:
        real = real_architecture_cost(cfg)
        print(
            f"  ViT-L-14-336 q for D_align (random weights, real compute) {real:8.3f} s = {real / round_s:5.2f} rounds"
        )


if __name__ == "__main__":
    main()

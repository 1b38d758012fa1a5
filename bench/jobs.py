"""`bench.compare --jobs N` against `--jobs 1` on the same small grid, side by side in one run.

Both grids run the same cells (`bench.compare --quick` settings, the given methods and IFs, one seed) into
two fresh folders, the one-at-a-time grid first; each prints its wall time, then the ratio. The cells'
accuracies must agree between the two (each cell is its own seeded run wherever it computes), and the
bench says so.

Usage: python -m bench.jobs [--jobs 2] [--methods fedavg,fedprox] [--ifs 10,50]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from bench import compare


def grid_seconds(out: Path, jobs: int, methods: str, ifs: str) -> tuple[float, dict[tuple, str]]:
    """Wall time of one quick grid and each cell's final accuracy, as results.csv gives it."""
    start = time.perf_counter()
    args = ["--quick", "--methods", methods, "--ifs", ifs, "--seeds", "7", "--jobs", str(jobs), "--out", str(out)]
    if compare.main(args) != 0:
        raise SystemExit(f"the --jobs {jobs} grid failed; see the launch.log files under {out}/cells")
    seconds = time.perf_counter() - start
    with (out / "results.csv").open() as fh:
        accuracy = {(r["method"], r["imbalance-factor"]): r["accuracy"] for r in csv.DictReader(fh)}
    return seconds, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", default="fedavg,fedprox")
    parser.add_argument("--ifs", default="10,50")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        one, one_acc = grid_seconds(Path(tmp) / "jobs1", 1, args.methods, args.ifs)
        many, many_acc = grid_seconds(Path(tmp) / f"jobs{args.jobs}", args.jobs, args.methods, args.ifs)
    cells = len(one_acc)
    print(f"grid of {cells} cells: --jobs 1 {one:.0f} s, --jobs {args.jobs} {many:.0f} s")
    print(f"wall time --jobs {args.jobs} / --jobs 1: {many / one:.2f} (speed-up {one / many:.2f}x)")
    print("cell accuracies equal between the two grids:", one_acc == many_acc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

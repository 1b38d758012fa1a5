"""Wall time, peak memory and final accuracy of the offline default run (what `make run` does).

Peak memory is the largest sum of resident memory over the launcher's whole process tree (SuperLink,
SuperExec, simulation, Ray and its ClientApp actors), sampled every 0.2 s.

Usage: python -m bench.default_run [--run-config "k=v ..."]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import failure, launch_run, run_dirs
from flcore.reports import read_summary
from server_app.watchdog import process_tree


def tree_rss_mb(pid: int) -> float:
    total_kb = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.default_run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    peak = 0.0

    def sample(pid: int) -> None:
        nonlocal peak
        peak = max(peak, tree_rss_mb(pid))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        ok = launch_run(out, args.run_config, watch=sample)
        wall = time.perf_counter() - start
        if not ok:
            sys.exit(failure(out, "the run"))
        summary = read_summary(run_dirs(out, finished=True)[-1])
    final = summary["final"]
    print(
        f"wall time {wall:.1f} s | peak memory {peak:.0f} MB (whole process tree) | "
        f"final accuracy {final['accuracy']:.3f}, balanced {final['balanced-accuracy']:.3f}, "
        f"many/medium/few {final['many-accuracy']:.3f}/{final['medium-accuracy']:.3f}/{final['few-accuracy']:.3f}"
        f" | best {summary['best-accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()

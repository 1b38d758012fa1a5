"""Wall time, peak memory and final accuracy of the offline default run (what `make run` does).

Peak memory is the largest sum of resident memory over the launcher's whole process tree (SuperLink,
SuperExec, simulation, Ray and its ClientApp actors), sampled every 0.2 s.

Usage: python bench/default_run.py [--run-config "k=v ..."]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flcore.run_config import format_overrides  # noqa: E402
from server_app.watchdog import process_tree  # noqa: E402


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        overrides = ["--run-config", args.run_config, "--run-config", format_overrides({"output-dir": out})]
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "server_app.launch", *overrides], cwd=ROOT, stdout=subprocess.DEVNULL
        )
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.2)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"the run failed (exit {proc.returncode})")
        (run_dir,) = list(Path(out).iterdir())
        summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    print(
        f"wall time {wall:.1f} s | peak memory {peak:.0f} MB (whole process tree) | "
        f"final accuracy {final['accuracy']:.3f}, balanced {final['balanced-accuracy']:.3f}, "
        f"many/medium/few {final['many-accuracy']:.3f}/{final['medium-accuracy']:.3f}/{final['few-accuracy']:.3f}"
        f" | best {summary['best-accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()

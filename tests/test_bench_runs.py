"""bench/runs.py, the one launch of a real run the benchmarks share, and the metrics reader beside the writer."""

import os
import sys

import pytest

from bench import runs
from flcore.reports import RunReport, read_metrics, read_summary


def test_the_launch_command_puts_the_output_dir_last_and_mappings_as_toml_values(tmp_path):
    command = runs.launch_command(tmp_path, "conf/x.toml", {"seed": 7, "strategy": "fedavg", "amp": False}, "")
    assert command[:3] == [sys.executable, "-m", "server_app.launch"]
    assert command[3:] == [
        "--run-config",
        "conf/x.toml",
        "--run-config",
        'seed=7 strategy="fedavg" amp=false',  # an empty config adds no argument
        "--run-config",
        f'output-dir="{tmp_path}"',  # a config naming another output-dir cannot send the run elsewhere
    ]
    with_share = runs.launch_command(tmp_path, federation="client-resources-num-gpus=0.5")
    assert with_share[-2:] == ["--federation-config", "client-resources-num-gpus=0.5"]


def fake_launcher(code: int, rounds: int):
    """A launcher stand-in: writes `rounds` metrics rows into a run folder, slowly, then exits with `code`."""
    script = (
        "import json, sys, time, pathlib\n"
        "run = pathlib.Path(sys.argv[1]) / '42'\n"
        "run.mkdir(parents=True)\n"
        f"for r in range({rounds}):\n"
        "    with (run / 'metrics.jsonl').open('a') as fh:\n"
        "        fh.write(json.dumps({'round': r}) + '\\n')\n"
        "    time.sleep(0.3)\n"
        f"if {code} == 0:\n"
        "    (run / 'summary.json').write_text('{\"final\": {}}')\n"
        f"print('launcher says bye'); sys.exit({code})\n"
    )
    return lambda out_dir, *configs, **options: [sys.executable, "-c", script, str(out_dir)]


def test_a_launch_logs_to_its_folder_reports_success_and_is_watched_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "launch_command", fake_launcher(0, rounds=3))
    seen = []
    assert runs.launch_run(tmp_path / "ok", {"seed": 1}, watch=lambda pid: seen.append(pid)) is True
    assert len(seen) >= 3 and len(set(seen)) == 1  # called again and again with the launcher's pid
    assert "launcher says bye" in (tmp_path / "ok" / runs.LOG).read_text()
    (run,) = runs.run_dirs(tmp_path / "ok", finished=True)
    assert [r["round"] for r in read_metrics(run)] == [0, 1, 2] and read_summary(run) == {"final": {}}

    monkeypatch.setattr(runs, "launch_command", fake_launcher(3, rounds=1))
    assert runs.launch_run(tmp_path / "failed") is False
    assert runs.run_dirs(tmp_path / "failed") == [tmp_path / "failed" / "42"]  # it logged a round
    assert runs.run_dirs(tmp_path / "failed", finished=True) == []  # but never completed
    assert runs.failure(tmp_path / "failed", "the run").splitlines()[-1] == "launcher says bye"


def test_read_metrics_gives_back_what_the_report_wrote_and_skips_blank_lines(tmp_path):
    report = RunReport(tmp_path, num_rounds=2, classes=["a", "b"])
    for r in (0, 1):
        report.record_eval(r, {"accuracy": 0.5 * r, "balanced-accuracy": 0.5})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write("\n")
    rows = read_metrics(tmp_path)
    assert [(r["round"], r["accuracy"]) for r in rows] == [(0, 0.0), (1, 0.5)]


def test_slots_split_the_cores_into_disjoint_shares_and_deal_the_gpus():
    two = runs.slots(2, cores=[0, 1, 2, 3])
    assert [s.cores for s in two] == [frozenset({0, 2}), frozenset({1, 3})]
    assert [s.gpus for s in two] == [None, None]  # no GPU: the environment's CUDA_VISIBLE_DEVICES is left alone
    assert [s.gpus for s in runs.slots(3, cores=range(6), gpus=2)] == ["0", "1", "0"]  # more jobs than GPUs: shared
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"--jobs {bad}: expected 1..4"):
            runs.slots(bad, cores=[0, 1, 2, 3])


def test_a_run_in_a_slot_sees_only_its_cores_and_gpus(tmp_path, monkeypatch):
    script = "import os; print(sorted(os.sched_getaffinity(0)), os.environ.get('CUDA_VISIBLE_DEVICES'))"
    monkeypatch.setattr(runs, "launch_command", lambda out_dir, *c, **options: [sys.executable, "-c", script])
    core = min(os.sched_getaffinity(0))
    assert runs.launch_run(tmp_path, slot=runs.Slot(frozenset({core}), "3")) is True
    assert (tmp_path / runs.LOG).read_text().strip() == f"[{core}] 3"

"""bench/compare.py without running the apps: reading finished cells, the table, the CSV, resuming."""

import json
import threading
import time

import numpy as np
import pytest

from bench import compare
from tests.helpers import write_run

FINAL_KEYS = ("accuracy", "balanced-accuracy", "many-accuracy", "medium-accuracy", "few-accuracy")


def fake_cell(root, method, imbalance, seed, accuracy, seconds=(1.0, 3.0)):
    cell = compare.Cell(method, imbalance, seed, root / method / f"if{imbalance:g}" / f"seed{seed}")
    run = cell.dir / "123"
    run.mkdir(parents=True)
    rows = [{"round": 0, "seconds": 0.5, "accuracy": 0.1}]
    rows += [
        {"round": r, "seconds": s, "accuracy": accuracy, "upload-bytes": 2.0**20, "peak-rss-mb": 100.0 + r}
        for r, s in enumerate(seconds, 1)
    ]
    write_run(run, rows, {"final": dict.fromkeys(FINAL_KEYS, accuracy), "wall-seconds": 9.0})
    return cell


def test_cell_results_table_and_csv(tmp_path):
    cells = [
        fake_cell(tmp_path, "fedavg", 10.0, 7, 0.50),
        fake_cell(tmp_path, "fedavg", 10.0, 8, 0.60),
        fake_cell(tmp_path, "focal", 10.0, 7, 0.70),
        fake_cell(tmp_path, "focal", 10.0, 8, 0.70),
        fake_cell(tmp_path, "focal", 50.0, 7, 0.40),
    ]
    results = [compare.cell_result(c) for c in cells]
    assert results[0]["round-seconds"] == 2.0 and results[0]["peak-rss-mb"] == 102.0
    text = compare.table(results, ["fedavg", "focal"], [10.0, 50.0])
    lines = text.splitlines()
    assert lines[0].startswith("| method | IF 10 | IF 50 | round s")
    assert lines[2].startswith("| fedavg | 55.00 ± 7.07 | – | 2.00 | 1.00 MiB | 102 |")
    assert lines[3].startswith("| focal | **70.00 ± 0.00** | **40.00 ± 0.00** |")
    compare.write_csv(results, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().count("\n") == 6
    results[1]["upload-bytes"] = float("nan")  # a run whose last round had no valid reply
    assert "| fedavg | **55.00 ± 7.07** | – | 2.00 | 1.00 MiB |" in compare.table(results, ["fedavg"], [10.0, 50.0])


def test_a_cell_whose_clients_diverged_is_marked_in_the_table_not_left_as_not_run(tmp_path, monkeypatch):
    def run_cell(cell, overrides, slot=None):  # ratioloss seed 7 diverges, seed 8 finishes; fedavg crashes
        cell.dir.mkdir(parents=True)
        if (cell.method, cell.seed) == ("ratioloss", 8):
            fake_cell(tmp_path / "cells", "ratioloss", 10.0, 8, 0.6)
        reason = "metrics ['train-loss'] are NaN or Inf" if cell.method == "ratioloss" else "Traceback"
        (cell.dir / "launch.log").write_text(f"client 3: {reason}\n")
        return cell.finished_run() is not None

    monkeypatch.setattr(compare, "run_cell", run_cell)
    args = ["--methods", "ratioloss,fedavg", "--ifs", "10", "--seeds", "7,8", "--out", str(tmp_path)]
    assert compare.main(args) == 1
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2].startswith("| ratioloss [1] | **60.00 ± 0.00** (n=1, 1 diverged) | ")
    assert lines[3] == "| fedavg | 2 failed | – | – | – |"
    assert lines[5].startswith("[1] ratioloss trains its clients with lr=0.001 momentum=0.9 weight-decay=0.0005,")
    assert compare.cell_failure(compare.Cell("fedavg", 10.0, 9, tmp_path / "never")) is None


def test_a_row_trained_with_its_own_client_settings_is_marked_with_a_footnote(tmp_path):
    methods = {**compare.METHODS, "fedavg-slow": "strategy=fedavg lr=0.01 local-epochs=2", "mine": "loss=focal"}
    notes = compare.training_notes(methods, ["fedavg", "fedavg-slow", "mine", "ratioloss"])
    assert (
        notes["fedavg-slow"] == "fedavg-slow trains its clients with lr=0.01 local-epochs=2, not the grid's settings."
    )
    assert "at the protocol's lr 0.1" in notes["ratioloss"] and set(notes) == {"fedavg-slow", "ratioloss"}
    results = [
        compare.cell_result(fake_cell(tmp_path, m, 10.0, 7, 0.5)) for m in ("fedavg", "ratioloss", "fedavg-slow")
    ]
    lines = compare.table(results, ["fedavg", "ratioloss", "fedavg-slow"], [10.0], notes=notes).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| fedavg", "| ratioloss [1]", "| fedavg-slow [2]"]
    assert lines[5:] == ["", f"[1] {notes['ratioloss']}", f"[2] {notes['fedavg-slow']}"]


def test_finished_cells_are_not_rerun(tmp_path, monkeypatch):
    fake_cell(tmp_path / "cells", "fedavg", 10.0, 7, 0.5)
    ran = []

    def run_cell(cell, overrides, slot=None):
        ran.append((cell.method, cell.imbalance, overrides))
        fake_cell(tmp_path / "cells", cell.method, cell.imbalance, cell.seed, 0.6)
        return True

    monkeypatch.setattr(compare, "run_cell", run_cell)
    args = ["--methods", "fedavg,fednova", "--ifs", "10", "--seeds", "7", "--out", str(tmp_path)]
    assert compare.main(args) == 0
    names = {"log-group": tmp_path.name, "log-name": "fednova-if10-seed7"}  # the grid's group, the cell's row
    assert ran == [("fednova", 10.0, {**names, "strategy": "fednova"})]
    assert "| fednova | **60.00 ± 0.00** |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "curves_if10.png").is_file()


def test_a_grid_logs_its_cells_as_one_group_unless_told_another(tmp_path, monkeypatch, capsys):
    sent = []

    def run_cell(cell, overrides, slot=None):
        sent.append(overrides)
        fake_cell(cell.dir.parents[2], cell.method, cell.imbalance, cell.seed, 0.6)
        return True

    monkeypatch.setattr(compare, "run_cell", run_cell)
    grid = ["--methods", "fedavg", "--ifs", "10,50", "--seeds", "7"]
    assert compare.main([*grid, "--out", str(tmp_path / "a"), "--run-config", "log-to='tensorboard,wandb'"]) == 0
    assert [(s["log-group"], s["log-name"], s["log-to"]) for s in sent] == [
        ("a", "fedavg-if10-seed7", "tensorboard,wandb"),
        ("a", "fedavg-if50-seed7", "tensorboard,wandb"),
    ]
    assert f"tensorboard --logdir {tmp_path / 'a' / 'cells'}" in capsys.readouterr().out
    sent.clear()
    assert compare.main([*grid, "--out", str(tmp_path / "b"), "--run-config", "log-group='ablation'"]) == 0
    assert {s["log-group"] for s in sent} == {"ablation"}


def test_report_only_tables_a_partial_grid_without_running(tmp_path, monkeypatch):
    fake_cell(tmp_path / "cells", "fedavg", 10.0, 7, 0.5)
    monkeypatch.setattr(compare, "run_cell", lambda cell, overrides: pytest.fail(f"ran {cell}"))
    args = ["--methods", "fedavg,fednova", "--ifs", "10", "--seeds", "7", "--out", str(tmp_path), "--report-only"]
    assert compare.main(args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| fedavg | **50.00 ± 0.00** |" in table and "fednova" not in table
    merged = tmp_path / "merged"  # a report from borrowed rows alone, into a folder that does not exist yet
    args = ["--methods", "fedavg", "--ifs", "10", "--seeds", "7", "--out", str(merged), "--report-only"]
    assert compare.main([*args, "--include", str(tmp_path / "results.csv")]) == 0
    assert "| fedavg | **50.00 ± 0.00** |" in (merged / "table.md").read_text()


def test_csv_round_trips_the_cells_with_their_curves_and_reads_old_csvs_without(tmp_path):
    results = [compare.cell_result(fake_cell(tmp_path, m, 10.0, 7, 0.25)) for m in ("fedavg", "focal")]
    compare.write_csv(results, tmp_path / "r.csv")
    assert compare.read_csv(tmp_path / "r.csv") == results
    header, *lines = (tmp_path / "r.csv").read_text().splitlines()
    old = [line.rsplit(',"[[', 1)[0] for line in lines]  # the curve is the last column, quoted JSON
    (tmp_path / "old.csv").write_text("\n".join([header.removesuffix(",curve"), *old]) + "\n")
    assert compare.read_csv(tmp_path / "old.csv") == [{k: v for k, v in r.items() if k != "curve"} for r in results]


def test_include_fills_cells_from_an_earlier_csv_and_local_cells_win(tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    results = [compare.cell_result(fake_cell(earlier, "fedavg", i, 7, a)) for i, a in ((10.0, 0.2), (50.0, 0.3))]
    compare.write_csv(results, tmp_path / "earlier.csv")
    fake_cell(tmp_path / "cells", "fedavg", 10.0, 7, 0.9)
    monkeypatch.setattr(compare, "run_cell", lambda cell, overrides: pytest.fail(f"ran {cell}"))
    base = ["--methods", "fedavg", "--ifs", "10,50", "--seeds", "7", "--out", str(tmp_path)]
    assert compare.main([*base, "--include", str(tmp_path / "missing.csv")]) == 2
    assert compare.main([*base, "--include", str(tmp_path / "earlier.csv")]) == 0
    assert "| fedavg | **90.00 ± 0.00** | **30.00 ± 0.00** |" in (tmp_path / "table.md").read_text()
    rows = compare.read_csv(tmp_path / "results.csv")
    assert [(r["imbalance-factor"], r["seed"], r["accuracy"]) for r in rows] == [(10.0, 7, 0.9), (50.0, 7, 0.3)]
    assert rows[1]["curve"] == results[1]["curve"]
    assert (tmp_path / "curves_if50.png").is_file()
    report = [*base[:3], "10,50,100", *base[4:], "--report-only", "--include", str(tmp_path / "earlier.csv")]
    assert compare.main(report) == 0
    assert "| **30.00 ± 0.00** | – |" in (tmp_path / "table.md").read_text()
    assert not (tmp_path / "curves_if100.png").exists()


def finished_run(root, method, imbalance, seed, cm, final):
    """A cell folder holding one finished run with a final confusion matrix and class names."""
    run = root / "cells" / method / f"if{imbalance:g}" / f"seed{seed}" / "1"
    run.mkdir(parents=True)
    rows = [{"round": 0, "accuracy": 0.1, "confusion-matrix": [[1, 1], [1, 1]]}, {"round": 2, "confusion-matrix": cm}]
    write_run(run, rows, {"final": final})
    (run / "partition.json").write_text(json.dumps({"classes": ["cat", "dog"]}))
    return run


def test_figure4_compares_the_run_with_alignment_to_the_run_without(tmp_path):
    from flcore.metrics import row_normalised

    without = dict(zip(FINAL_KEYS, (0.55, 0.5, 0.9, None, 0.1), strict=True))
    with_align = dict(zip(FINAL_KEYS, (0.7, 0.65, 0.875, None, 0.45), strict=True))
    runs = {
        "ours-no-align": finished_run(tmp_path, "ours-no-align", 10.0, 7, [[9, 1], [9, 1]], without),
        "ours": finished_run(tmp_path, "ours", 10.0, 7, [[7, 3], [4, 6]], with_align),
    }
    finished_run(tmp_path, "ours", 50.0, 7, [[1, 0], [0, 1]], with_align)  # no run without alignment at IF 50
    cells = [
        compare.Cell(m, i, 7, tmp_path / "cells" / m / f"if{i:g}" / "seed7")
        for m in ("ours", "ours-no-align")
        for i in (10.0, 50.0)
    ]
    assert compare.write_figure4(cells, tmp_path) == [tmp_path / "figure4_if10_seed7.png"]
    assert (tmp_path / "figure4_if10_seed7.png").stat().st_size > 0
    numbers = json.loads((tmp_path / "figure4_if10_seed7.json").read_text())
    assert numbers["without-alignment"] == {"method": "ours-no-align", "run": str(runs["ours-no-align"]), **without}
    assert numbers["with-alignment"]["few-accuracy"] == 0.45 and numbers["with-alignment"]["run"] == str(runs["ours"])

    fig, _ = compare.figure4(runs["ours-no-align"], runs["ours"], "IF 10, seed 7")
    left, right = fig.axes[0], fig.axes[1]
    assert left.get_title() == "without alignment (ours-no-align): acc 0.550\nmany 0.90 few 0.10"
    assert right.get_title() == "with alignment (ours): acc 0.700\nmany 0.88 few 0.45"
    assert np.allclose(right.images[0].get_array(), row_normalised(np.array([[7, 3], [4, 6]])))
    assert [t.get_text() for t in left.get_xticklabels()] == ["cat", "dog"]


def test_a_grid_with_both_cells_draws_figure4(tmp_path, monkeypatch):
    for method in ("ours", "ours-no-align"):
        run = finished_run(tmp_path, method, 10.0, 7, [[5, 5], [2, 8]], dict.fromkeys(FINAL_KEYS, 0.6))
        rows = [{"round": 0, "seconds": 0.5, "accuracy": 0.1}, {"round": 1, "seconds": 1.0, "accuracy": 0.6}]
        rows[-1] |= {"confusion-matrix": [[5, 5], [2, 8]], "upload-bytes": 1.0, "peak-rss-mb": 1.0}
        write_run(run, rows, {"final": dict.fromkeys(FINAL_KEYS, 0.6), "wall-seconds": 1.0})
    monkeypatch.setattr(compare, "run_cell", lambda cell, overrides: pytest.fail(f"ran {cell}"))
    args = ["--methods", "ours,ours-no-align", "--ifs", "10", "--seeds", "7", "--out", str(tmp_path)]
    assert compare.main(args) == 0
    assert (tmp_path / "figure4_if10_seed7.png").is_file() and (tmp_path / "figure4_if10_seed7.json").is_file()


def test_jobs_run_cells_side_by_side_each_in_its_own_slot(tmp_path, monkeypatch):
    running, most, slots_seen, lock = set(), [0], [], threading.Lock()

    def run_cell(cell, overrides, slot=None):
        with lock:
            running.add(cell.key)
            most[0] = max(most[0], len(running))
            slots_seen.append(slot)
        time.sleep(0.3)
        fake_cell(tmp_path / "cells", cell.method, cell.imbalance, cell.seed, 0.5)
        with lock:
            running.discard(cell.key)
        return True

    monkeypatch.setattr(compare, "run_cell", run_cell)
    monkeypatch.setattr(compare, "slots", lambda jobs, gpus: [f"slot{i}" for i in range(jobs)])
    args = ["--methods", "fedavg,fednova", "--ifs", "10,50", "--seeds", "7", "--out", str(tmp_path), "--jobs", "2"]
    assert compare.main(args) == 0
    assert most[0] == 2 and sorted(slots_seen) == ["slot0", "slot0", "slot1", "slot1"]
    assert "| fednova | **50.00 ± 0.00** | **50.00 ± 0.00** |" in (tmp_path / "table.md").read_text()


def test_more_jobs_than_cores_is_refused_before_any_cell_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_cell", lambda cell, overrides, slot=None: pytest.fail(f"ran {cell}"))
    assert compare.main(["--methods", "fedavg", "--out", str(tmp_path), "--jobs", "999"]) == 2
    assert "--jobs 999: expected 1.." in capsys.readouterr().err


def test_a_built_in_row_redefined_by_method_says_what_changed():
    methods = {**compare.METHODS, "feddf": "strategy=feddf feddf-steps=40 feddf-patience=20"}
    notes = compare.training_notes(methods, ["fedavg", "feddf"])
    note = "feddf runs here with feddf-steps=40 feddf-patience=20 (redefined by --method; built in: strategy=feddf)."
    assert notes == {"feddf": note}


def test_a_cell_with_fewer_seeds_than_the_grid_says_how_many(tmp_path):
    results = [compare.cell_result(fake_cell(tmp_path, "fedavg", 10.0, s, a)) for s, a in ((7, 0.5), (8, 0.7))]
    results.append(compare.cell_result(fake_cell(tmp_path, "fedprox", 10.0, 7, 0.4)))
    lines = compare.table(results, ["fedavg", "fedprox"], [10.0], seeds=2).splitlines()
    assert lines[2].startswith("| fedavg | **60.00 ± 14.14** | ")
    assert lines[3].startswith("| fedprox | 40.00 ± 0.00 (n=1) | ")

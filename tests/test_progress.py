"""Long steps show how far they are and the time left: a tqdm bar on a terminal, plain lines in a log file."""

import io
import re
from contextlib import redirect_stdout

import numpy as np
import pytest
from tqdm import tqdm

from alignment import holdout
from flcore import progress as progress_module
from flcore.config import validate
from flcore.progress import PlainProgress, duration, progress
from flcore.reports import RunReport
from strategies.registry import STRATEGIES
from tests.helpers import validated

LINE = re.compile(r"^\[(?P<desc>[^\]]+)\] (?P<k>\d+)/(?P<n>\d+) (?P<unit>\w+) \(\d+%\), [0-9.e+-]+ s/\w+, ~\w+ left$")


@pytest.fixture
def no_delay(monkeypatch):
    """Every step counts as long: the lines a step of minutes prints, from a step of milliseconds."""
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_one_plain_line_per_tenth_with_the_time_left(no_delay):
    out = io.StringIO()
    assert list(progress(range(50), desc="work", unit="step", stream=out)) == list(range(50))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    ticks = [LINE.match(line) for line in lines[:-1]]
    assert all(ticks), lines
    assert [int(t["k"]) for t in ticks] == list(range(5, 51, 5))  # every tenth of the work
    assert {t["n"] for t in ticks} == {"50"} and {t["unit"] for t in ticks} == {"step"}
    assert lines[-1].startswith("[work] done: 50 step in ")


def test_a_step_done_within_the_delay_prints_nothing():
    out = io.StringIO()
    for _ in progress(range(1000), desc="quick", stream=out):
        pass
    assert out.getvalue() == ""


def test_without_a_total_the_lines_come_every_few_seconds(no_delay, monkeypatch):
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    out = io.StringIO()
    bar = progress(desc="stream", unit="item", stream=out)
    for _ in range(3):
        bar.update()
    bar.close()
    assert out.getvalue().splitlines()[0].startswith("[stream] 1 item, ")
    assert "left" not in out.getvalue()  # no total, no time left claimed


def test_a_resumed_step_counts_only_what_it_timed(no_delay):
    out = io.StringIO()
    bar = progress(total=10, initial=8, desc="dwp", unit="step", stream=out)
    bar.update()
    bar.update()
    bar.close()
    assert out.getvalue().splitlines()[0].startswith("[dwp] 9/10 step (90%), ")


def test_a_terminal_gets_a_tqdm_bar():
    assert isinstance(progress(range(3), desc="bar", stream=Terminal()), tqdm)
    assert isinstance(progress(range(3), desc="log", stream=io.StringIO()), PlainProgress)


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (4.4, 65, 3 * 3600 + 7 * 60)] == ["4s", "1m05s", "3h07m"]


def test_the_stand_in_teachers_training_writes_progress_to_its_log_file(tmp_path, no_delay, one_thread):
    """The issue's case: `align-teacher=holdout` trained for half an hour and its log said nothing."""
    raw = {"num-clients": 4, "projection-dim": 32, "image-size": 8, "holdout-epochs": 1}
    cfg = validate(
        {**raw, "align": True, "align-teacher": "holdout", "output-dir": str(tmp_path)},
        choices={"strategy": STRATEGIES},
    )
    log = tmp_path / "server.log"
    with log.open("w") as sink, redirect_stdout(sink):
        holdout.load_or_train(cfg)
    lines = log.read_text().splitlines()
    assert "\r" not in log.read_text()
    ticks = [m for m in map(LINE.match, lines) if m and m["desc"] == "teacher"]
    assert len(ticks) >= 2 and ticks[-1]["k"] == ticks[-1]["n"]  # one line per step: fewer than ten
    assert any(line.startswith("[teacher] done: ") for line in lines)


def test_rounds_say_seconds_per_round_and_time_left(tmp_path, capsys):
    report = RunReport.create(validated(output_dir=str(tmp_path), num_server_rounds=4), 1, ["a", "b"])
    row = {"accuracy": 0.5, "balanced-accuracy": 0.5, "per-class-accuracy": [0.5, 0.5]}
    report.record_eval(0, row)
    report.record_eval(1, row)
    report.round_ended(1)  # evaluated: already said
    report.round_ended(2)  # not evaluated (eval-every > 1): a line of its own
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[round   0/4]") and "left" not in lines[0]
    assert re.search(r"\| [0-9.e+-]+ s/round, ~\w+ left$", lines[1])
    assert re.fullmatch(r"\[round   2/4\] [0-9.e+-]+ s/round, ~\w+ left", lines[2])
    assert np.isfinite(float(lines[2].split()[2]))

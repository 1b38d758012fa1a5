"""Progress and time left for every step that can take more than a few seconds.

A researcher watching a run must see how far a long step is and how long is left: the stand-in teacher's
training, DWP, annotation, teacher logits, the server-side training of CCVR, CReFF, FedDF and FedBE, image
checks, a large split, the rounds. On a terminal that is a tqdm bar. A ServerApp's output is never a terminal
(Flower keeps it as the run's log, or it goes to a file), and a tqdm bar there is one endless line of carriage
returns; so when the output is not a terminal, `progress` prints one plain line per update instead
("k/N, s per item, ~time left"), at every tenth of the work or every `EVERY_S` seconds, whichever comes first.
A step finished within `DELAY_S` prints nothing, so the many short steps of a small run stay quiet.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

DELAY_S = 5.0  # no output for a step that finishes sooner
EVERY_S = 30.0  # longest gap between two plain lines
FRACTION = 0.1  # a plain line at every tenth of the work


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a log line, exact enough to plan around."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def pace(done: int, total: int | None, elapsed: float, unit: str, initial: int = 0) -> str:
    """`X s/unit, ~T left` over the `done - initial` items timed in `elapsed` (a resumed step's earlier items
    took no time here); empty before the first timed item, no time left when the total is unknown."""
    counted = done - initial
    if counted <= 0:
        return ""
    per = elapsed / counted
    left = f", ~{duration(per * max(total - done, 0))} left" if total else ""
    return f"{per:.3g} s/{unit}{left}"


def status(done: int, total: int | None, elapsed: float, unit: str, initial: int = 0) -> str:
    """`k/N unit (p%), X s/unit, ~T left`."""
    text = f"{done}/{total} {unit} ({100 * done / total:.0f}%)" if total else f"{done} {unit}"
    rate = pace(done, total, elapsed, unit, initial)
    return f"{text}, {rate}" if rate else text


class PlainProgress:
    """tqdm's iterate/update/close for a log file: one line per update at most every tenth of the work or
    `EVERY_S` seconds, nothing before `DELAY_S`, a closing line when any was printed."""

    def __init__(
        self,
        iterable: Iterable | None,
        total: int | None,
        desc: str,
        unit: str,
        stream: IO[str],
        initial: int = 0,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.stream = iterable, total, desc, unit, stream
        self.n = self.initial = initial
        self.step = max(1, math.ceil(total * FRACTION)) if total else 0
        self.next_mark = self._mark_after(initial)
        self.start = self.last = time.perf_counter()
        self.printed = False

    def _mark_after(self, n: int) -> int:
        return (n // self.step + 1) * self.step if self.step else 0

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress made without an iterable cannot be iterated")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.start < DELAY_S:
            return
        at_mark = bool(self.step) and self.n >= self.next_mark
        if at_mark or now - self.last >= EVERY_S:
            self._print(now)

    def _print(self, now: float) -> None:
        line = status(self.n, self.total, now - self.start, self.unit, self.initial)
        print(f"[{self.desc}] {line}", file=self.stream, flush=True)
        self.last, self.printed = now, True
        self.next_mark = self._mark_after(self.n)

    def close(self) -> None:
        """Say the step is done, in how long, when it was long enough to have printed progress."""
        if self.printed:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.desc}] done: {self.n} {self.unit} in {duration(elapsed)}", file=self.stream, flush=True)
            self.printed = False


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    stream: IO[str] | None = None,
) -> tqdm | PlainProgress:
    """A tqdm bar on a terminal, plain lines otherwise; iterate it, or `update()` it and `close()` it (both
    work as context managers). Output goes to `stream`, standard output by default, where the run's other
    lines go."""
    stream = sys.stdout if stream is None else stream
    if is_terminal(stream):
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, delay=DELAY_S, dynamic_ncols=True
        )
    return PlainProgress(iterable, total, desc, unit, stream, initial)

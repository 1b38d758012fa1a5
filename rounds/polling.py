"""A Grid adapter that collects replies as soon as they arrive.

Flower 1.42's networked Grid (`HttpGrid.send_and_receive`) polls the SuperLink every 3 seconds, so
each round idles 0-3 s (1.5 s on average) after the last reply has arrived: on a short round that is
more than the whole messaging cost. `PromptGrid` wraps any Grid, delegates everything to it, and
re-implements only `send_and_receive` with a short, growing poll interval.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

FIRST_POLL_S = 0.02
MAX_POLL_S = 0.5


class PromptGrid(Grid):
    """Delegates to `grid`; polls for replies every 20 ms, backing off to 0.5 s."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply is in or `timeout` seconds have passed (None: no limit)."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = FIRST_POLL_S
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(interval)
            interval = min(interval * 1.5, MAX_POLL_S)
        return replies

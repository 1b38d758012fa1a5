"""A Grid adapter that collects replies as soon as they arrive.

Flower 1.42's networked Grid (`HttpGrid.send_and_receive`) polls the SuperLink every 3 seconds, so
each round idles 0-3 s (1.5 s on average) after the last reply has arrived: on a short round that is
more than the whole messaging cost. `PromptGrid` wraps any Grid, delegates everything to it, and
re-implements only `send_and_receive` with a short, growing poll interval.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message

from rounds.delegate import DelegatingGrid

FIRST_POLL_S = 0.02
MAX_POLL_S = 0.5


class PromptGrid(DelegatingGrid):
    """Delegates to the Grid it holds; polls for replies every 20 ms, backing off to 0.5 s."""

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

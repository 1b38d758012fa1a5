from types import SimpleNamespace

from rounds.polling import PromptGrid


class FakeGrid:
    """Replies to message i become available on pull number `ready[i]`."""

    def __init__(self, ready):
        self.ready, self.pulls = ready, 0

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i in sorted(ids)
            if self.ready[int(i)] <= self.pulls
        ]


def test_collects_every_reply_and_stops_at_the_last():
    fake = FakeGrid(ready=[1, 3, 5])
    replies = PromptGrid(fake).send_and_receive(["a", "b", "c"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert fake.pulls == 5


def test_timeout_returns_what_arrived():
    fake = FakeGrid(ready=[1, 10**9])
    replies = PromptGrid(fake).send_and_receive(["a", "b"], timeout=0.1)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]

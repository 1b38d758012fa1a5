"""Test settings: never reach a model or dataset hub; keep torch to the two cores quietly."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages built outside a Flower runtime need the process's run/node identity, as the runtime sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)

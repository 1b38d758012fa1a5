"""Test settings (never reach a model or dataset hub; one torch thread) and fixtures. Shared helpers live in
tests/helpers.py, imported by name."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any test imports a hub library; pytest itself does not
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def teacher_calls(monkeypatch):
    """Counts CLIP zero-shot forwards (one entry per call: its image count) without changing their results."""
    from alignment import teacher as clip_teacher

    calls = []
    real = clip_teacher.zero_shot_logits

    def counting(teacher, classes, images, *args, **kwargs):
        calls.append(len(images))
        return real(teacher, classes, images, *args, **kwargs)

    monkeypatch.setattr(clip_teacher, "zero_shot_logits", counting)
    return calls


@pytest.fixture(autouse=True)
def one_thread():
    """Every test: small models on a shared 2-core machine, where one intra-op thread avoids contention (8x
    faster here). Processes a test starts keep their own settings."""
    from tests.helpers import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture
def no_superlink(monkeypatch):
    """The launcher must stop on bad input before it starts any Flower process."""
    from server_app import launch

    def forbidden(*args, **kwargs):
        raise AssertionError("the SuperLink must not start on bad input")

    monkeypatch.setattr(launch, "start_superlink", forbidden)


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages built outside a Flower runtime need the process's run/node identity, as the runtime sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)

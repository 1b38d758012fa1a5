"""Run one function in a forked child process and hand its result back: memory it takes goes with the child.

The launcher lives as long as the run, so whatever its checks import or load stays resident the whole time:
the run's checks (`server_app.preflight`) import torch, torchvision, scikit-learn and flwr-datasets and hold
the decoded dataset, about 0.9 GB that nothing needs once they have passed. Run in a child, they end with it
before the SuperLink starts (`bench.default_run` measures it).

A fork, not a fresh interpreter: the child sees this process's state as it is (test fixtures that replace a
function, the parsed arguments) and starts at once. The result travels back pickled through a pipe, so it
must be plain data; an exception in the child comes back as `ChildFailed` carrying its traceback, as text, so
that unpickling it never imports the modules the child loaded.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeVar

T = TypeVar("T")


class ChildFailed(RuntimeError):
    """The function raised in the child (its traceback is the message), or the child died without an answer."""


def _answer(conn: Connection, fn: Callable[..., object], args: tuple) -> None:
    """The child's side: send ("ok", result) or ("raised", traceback text), then flush what it printed."""
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:  # every failure, SIGTERM's SystemExit included, goes back as text
        conn.send(("raised", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.close()


def fork_is_safe() -> bool:
    """A fork copies only the calling thread, so a lock another thread held at that moment (torch's thread pools,
    a gRPC or logging thread) stays locked in the child for ever (seen: a test calling the launcher in-process,
    its child waiting on a futex). The launcher process imports torch nowhere and runs one thread; a test or
    bench that calls it in-process has torch loaded already, and nothing to save by a child."""
    return "torch" not in sys.modules and threading.active_count() == 1


def call_apart(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a forked child; its return value here, or `ChildFailed`."""
    sys.stdout.flush()  # text still buffered here would be printed twice, once by each process
    sys.stderr.flush()
    fork = multiprocessing.get_context("fork")
    ours, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_answer, args=(theirs, fn, args))  # not daemonic: it may start loader processes
    child.start()
    theirs.close()  # the child's end: EOF here once the child is gone
    try:
        kind, value = ours.recv()
    except EOFError:
        child.join()
        raise ChildFailed(f"the child process ended with exit code {child.exitcode} before answering") from None
    except BaseException:  # interrupted here (Ctrl-C, SIGTERM): the child goes too
        child.terminate()
        child.join()
        raise
    finally:
        ours.close()
    child.join()
    if kind == "raised":
        raise ChildFailed(value)
    return value

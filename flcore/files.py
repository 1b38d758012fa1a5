"""Writing files so that a reader, or a run resumed after kill -9, never sees half of one.

Every file the project writes for later reading (run reports, checkpoints, caches) goes through
`atomic_write`: the content goes to a temporary name beside the target, is flushed to disk, and is
renamed over the target in one step. The one file that grows instead, a run's metrics log, is appended
with `append_text`, which cuts a failed append back to the last complete line.

A write that fails because the disk is full (ENOSPC, or torch's `basic_ios::clear: iostream error`, which
names neither the file nor the cause) raises `OutputWriteError` naming the folder and "no space left";
the files written before it stay as they were, so a run stopped this way resumes from its last checkpoint.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# What torch.save raises when its stream cannot be written: the C++ stream's message, no errno, no path.
TORCH_WRITE_FAILURES = ("basic_ios::clear", "file write failed", "unexpected pos")
NEARLY_FULL_BYTES = 64 * 2**20  # less free than this after a failed torch write: the disk filled up


class OutputWriteError(OSError):
    """A file could not be written; the message names its folder and the cause, and says what is intact."""


def _no_space(path: Path, err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in NO_SPACE
    if isinstance(err, RuntimeError) and any(m in str(err) for m in TORCH_WRITE_FAILURES):
        try:
            return shutil.disk_usage(path.parent).free < NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


def write_failure(path: Path, err: BaseException) -> BaseException:
    """`err` as an `OutputWriteError` naming `path`'s folder when the disk is full; any other error as it is."""
    if not _no_space(path, err):
        return err
    return OutputWriteError(
        f"no space left on the device of folder {path.parent} while writing {path.name} ({err}); the files "
        "written there before are intact (the last checkpoint.pt and reports of a run). Free space there, then "
        "resume the run from that folder (resume=<the folder>)."
    )


def unwritable(folder: Path) -> str | None:
    """Why no file can be written into `folder` (created if missing), or None when one can: checked before a run
    starts, since a folder under /proc or on a read-only mount would otherwise fail after the processes are up."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path`.

    If `write` fails, the temporary file is removed and whatever `path` held before stays as it was; a full
    disk is reported as `OutputWriteError` (`write_failure`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        failure = write_failure(path, err)
        if failure is err:
            raise
        raise failure from err
    os.replace(tmp, path)


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path`; if that fails, the file is cut back to what it held, so no half line is left."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with path.open("a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as err:
        if path.exists():
            os.truncate(path, size)
        failure = write_failure(path, err)
        if failure is err:
            raise
        raise failure from err


def json_safe(value: Any) -> Any:
    """NaN (an empty class group) becomes null and NumPy scalars plain numbers, so files stay valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, written atomically; values JSON does not know (paths) are written as text."""
    text = json.dumps(json_safe(obj), indent=2, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))

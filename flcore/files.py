"""Writing files so that a reader, or a run resumed after kill -9, never sees half of one.

Every file the project writes for later reading (run reports, checkpoints, caches) goes through
`atomic_write`: the content goes to a temporary name beside the target, is flushed to disk, and is
renamed over the target in one step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path`.

    If `write` fails, the temporary file is removed and whatever `path` held before stays as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


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

"""The launcher as it was before the default run was brought within 4 GiB: its checks in its own process.

`python -m bench.launch_in_process` takes `python -m server_app.launch`'s arguments and runs the same launcher,
except that the checks (`server_app.preflight`) run in the launcher's own process instead of a child
(`server_app.apart`), so torch, the libraries the checks import and the data they load stay resident in it for
the whole run. `bench.default_run` launches "today's" configuration with it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from server_app import launch

T = TypeVar("T")


def in_this_process(fn: Callable[..., T], *args: object) -> T:
    return fn(*args)


if __name__ == "__main__":
    launch.call_apart = in_this_process
    sys.exit(launch.main())

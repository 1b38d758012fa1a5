"""Start a SuperNode once its own data has been checked: `python -m client_app.supernode <flower-supernode arguments>`.

`flower-supernode` reads its `--node-config` only when a request arrives, in each ClientApp process: a
node started with a data-dir that does not exist would join the federation and fail every round. This
wrapper reads the same `--node-config` first and, for a node holding its own data (`data-dir`), refuses
to start (exit 2, one line) unless the folder exists, can be listed and holds at least one usable image;
it decodes each image once (`flcore.local_data.ImageChecks`, whose verdicts the ClientApp then reuses)
and says how many it will leave out. Then it becomes `flower-supernode` with the arguments unchanged.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from flwr.common.config import parse_config_args

from client_app.shard import DATA_DIR_KEY
from flcore.images import image_files
from flcore.local_data import CIFAR_FOLDERS, HF_MARKERS, ImageChecks


class NodeRefused(ValueError):
    """The node's own data cannot serve a run; the message says why, naming the node config key."""


def node_config(argv: Sequence[str]) -> dict:
    """The `--node-config` of a flower-supernode command line, parsed as Flower parses it."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--node-config"]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--node-config=")]
    try:
        return parse_config_args(values[-1:]) if values else {}
    except Exception as err:  # Flower's parser raises ValueError or TOML errors
        raise NodeRefused(f"--node-config {values[-1]!r} cannot be read: {err}") from err


def check_own_data(config: dict) -> str:
    """What this node's data-dir holds, or NodeRefused; '' for a node without one (it serves a partition)."""
    if DATA_DIR_KEY not in config:
        return ""
    root = Path(str(config[DATA_DIR_KEY])).expanduser()
    if not root.is_dir():
        raise NodeRefused(f"node config data-dir '{root}' is not an existing folder on this node.")
    if not os.access(root, os.R_OK | os.X_OK):
        raise NodeRefused(f"node config data-dir '{root}' cannot be listed by this user.")
    if any((root / name).is_dir() for name in CIFAR_FOLDERS) or any((root / n).is_file() for n in HF_MARKERS):
        return f"data-dir '{root}': a saved dataset, read at each request"
    files = tuple(str(path) for path in image_files(root))
    usable = int(ImageChecks(root).usable(files).sum())
    if not usable:
        raise NodeRefused(
            f"node config data-dir '{root}' holds no usable image ({len(files)} image files, none decodes): expected "
            "one subfolder per class with image files (.png, .jpg, ...) in them."
        )
    return f"data-dir '{root}': {usable} usable images, {len(files) - usable} image files left out (unusable)"


def supernode_binary() -> str:
    beside = Path(sys.executable).parent / "flower-supernode"
    return str(beside) if beside.is_file() else (shutil.which("flower-supernode") or "flower-supernode")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        found = check_own_data(node_config(argv))
    except NodeRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if found:
        print(found, flush=True)
    binary = supernode_binary()
    os.execv(binary, [binary, *argv])
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())

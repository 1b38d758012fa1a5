"""What a node holding its own data tells the server when a request fails: one line, never a path or a traceback.

Flower sends the text of whatever a ClientApp raises to the server as the node's error reply. A
DataLoader's error carries its worker's traceback with the image's path, and a folder check names the
folder. A node with its own data (`data-dir`) therefore logs the whole error in its own log and raises
instead a `NodeFailure` whose text is the first line of its own checks' message (`LocalDataError`), or
only the error's type for anything else, with every path replaced: its data-dir and what lies below it
by `<data-dir>`, any other absolute path by `<path>`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from logging import ERROR
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.logger import log

from client_app.shard import DATA_DIR_KEY
from flcore.local_data import LocalDataError

Handler = Callable[[Message, Context], Message]
ANY_PATH = re.compile(r"(?<![\w.<>-])/[^\s'\"]+")


class NodeFailure(RuntimeError):
    """A request failed on a node holding its own data; the text is what the server may see."""


def public_reason(err: BaseException, root: str) -> str:
    """The one line the server is told about `err` on a node whose data-dir is `root`."""
    text = str(err).splitlines()[0] if isinstance(err, LocalDataError) and str(err) else ""
    if not text:
        return f"{type(err).__name__} on this node while handling the request; the node's log has the details"
    for form in sorted({root, str(Path(root).expanduser()), str(Path(root).expanduser().resolve())}, key=len)[::-1]:
        text = re.sub(re.escape(form) + r"[^\s'\"]*", "<data-dir>", text)
    return ANY_PATH.sub("<path>", text)


def private_errors(handler: Handler) -> Handler:
    """`handler`, whose errors on a node holding its own data reach the server as `public_reason` only."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            root = context.node_config.get(DATA_DIR_KEY)
            if not root:
                raise
            reason = public_reason(err, str(root))
            log(ERROR, "this request failed; the server is told only: %s", reason, exc_info=err)
            raise NodeFailure(reason) from None

    return guarded

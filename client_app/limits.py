"""What a client accepts from the server: the global model of its own architecture, and nothing else.

A client on another machine trusts the server only as far as it must. Before anything is deserialised
it checks the message's shape: one `arrays` ArrayRecord and one `config` ConfigRecord, array payloads no
larger than `max-message-mb` in total, exactly the model's keys with the model's shapes; then each array's
`.npy` header must declare exactly the bytes that came (`flcore.arrays.npy_layout`), the array is read with
`np.load(allow_pickle=False)` (no pickles, no code) and must be finite numbers. Anything else is refused
with `MessageRejected` naming what was wrong; Flower sends that back to the server as an error reply,
which the server counts as a failed client.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from flcore.arrays import ArrayProblem, read_npy, read_numeric
from flcore.local_data import CLASSES_KEY

MAX_CONFIG_ENTRIES = 256
MAX_CONFIG_STRING = 4096
# Entries allowed to be larger: the class names a node holding its own data labels it with (ImageNet-LT: 1,000).
MAX_ENTRY = {CLASSES_KEY: 2**17}


class MessageRejected(ValueError):
    """The server's message is malformed or too large for this client."""


def _record(msg: Message, key: str, kind: type) -> ArrayRecord | ConfigRecord:
    record = msg.content.get(key) if key in msg.content else None
    if not isinstance(record, kind):
        found = sorted(msg.content.keys())
        raise MessageRejected(f"the server's message lacks a {kind.__name__} '{key}' (it has {found}).")
    return record


def check_config(config: ConfigRecord) -> int:
    """Bytes of the config's array payloads, after checking its entry count and the size of every other entry.

    A `bytes` entry is an `.npy` array (CReFF's classifier, for instance): it counts towards the message's
    size budget instead of the per-entry cap that holds for strings and lists. Nothing is decoded here.
    """
    if len(config) > MAX_CONFIG_ENTRIES:
        raise MessageRejected(f"the server's config has {len(config)} entries; at most {MAX_CONFIG_ENTRIES} allowed.")
    payload = 0
    for key, value in config.items():
        if isinstance(value, bytes):
            payload += len(value)
            continue
        values = value if isinstance(value, list) else [value]
        cap = MAX_ENTRY.get(key, MAX_CONFIG_STRING)
        if sum(len(v) if isinstance(v, str | bytes) else 1 for v in values) > cap:
            raise MessageRejected(f"the server's config entry '{key}' is larger than {cap} items/bytes.")
    return payload


def _check_config_arrays(config: ConfigRecord) -> None:
    """Every `.npy` entry of the config is plain finite numbers (read only once the message's size is known)."""
    for key, value in config.items():
        if isinstance(value, bytes):
            try:
                read_npy(key, value)
            except ArrayProblem as err:
                raise MessageRejected(f"the server's config {err}.") from err


def check_global(msg: Message, model_state: Mapping[str, torch.Tensor], max_mb: float) -> dict[str, torch.Tensor]:
    """The message's global weights as tensors, after checking they fit this client's model; else MessageRejected.

    Whatever reading the message raises (a MemoryError from a crafted header included) becomes MessageRejected,
    which Flower returns to the server as this client's error reply.
    """
    try:
        return _check_global(msg, model_state, max_mb)
    except MessageRejected:
        raise
    except Exception as err:
        raise MessageRejected(f"the server's message cannot be read ({type(err).__name__}: {err}).") from err


def _check_global(msg: Message, model_state: Mapping[str, torch.Tensor], max_mb: float) -> dict[str, torch.Tensor]:
    arrays = _record(msg, "arrays", ArrayRecord)
    config = _record(msg, "config", ConfigRecord)
    size = check_config(config) + sum(len(a.data) for a in arrays.values())
    if size > max_mb * 2**20:
        raise MessageRejected(f"the global model is {size / 2**20:.1f} MB; this client accepts at most {max_mb} MB.")
    _check_config_arrays(config)
    try:
        values = read_numeric(arrays, {k: tuple(v.shape) for k, v in model_state.items()})
    except ArrayProblem as err:
        raise MessageRejected(
            f"the global model does not fit this client's model: {err}; check that both sides use the same model "
            "settings."
        ) from err
    return {k: torch.from_numpy(v) for k, v in values.items()}

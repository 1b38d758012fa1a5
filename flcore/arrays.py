"""Model arrays on the network: reading them on either side, and a model's weights to and from a record.

Both the client (the server's global model) and the server (each client's update) must refuse arrays
that do not fit the model before using them: wrong keys or shapes, payloads that are not plain numeric
NumPy arrays (read with `np.load(allow_pickle=False)`, so nothing is unpickled), headers that declare more
data than came (checked before anything is allocated), NaN or Inf.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

NUMPY_STYPE = "numpy.ndarray"  # Flower's serialisation type of NumPy arrays
NON_FINITE = "NaN or Inf"  # the words of every refusal of non-finite numbers, which diverged runs are told by
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class ArrayProblem(ValueError):
    """The arrays do not fit the expected model; the message says how."""


def reply_arrays(content: RecordDict) -> ArrayRecord:
    """The one ArrayRecord of a client's reply, whatever its name (Flower's strategies read it by position too).

    Callers check first that there is exactly one (`rounds.guard.screen`); a reply without one raises
    StopIteration here.
    """
    return next(iter(content.array_records.values()))


def reply_metrics(content: RecordDict) -> MetricRecord:
    """The one MetricRecord of a client's reply, whatever its name; the same caveat as `reply_arrays`."""
    return next(iter(content.metric_records.values()))


def read_numeric(arrays: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Every array as a finite numeric NumPy array of the expected shape, or ArrayProblem naming the first fault."""
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ArrayProblem(
            f"array keys differ from the model's: missing {missing[:3]}, unexpected {extra[:3]} "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    out = {}
    for key, shape in shapes.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(shape):
            raise ArrayProblem(f"array '{key}' has shape {tuple(array.shape)}, the model has {tuple(shape)}")
        if array.stype != NUMPY_STYPE:
            raise ArrayProblem(
                f"array '{key}' cannot be read as a NumPy array: not a plain NumPy array ({array.stype})"
            )
        value = read_npy(key, array.data)
        if value.shape != tuple(shape):
            raise ArrayProblem(f"array '{key}' holds {value.shape}, not the model's shape")
        out[key] = value
    return out


def to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def load_state(model: nn.Module, received: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load weights, casting each to the model's own dtype (FedAvg returns float64 counters)."""
    state = model.state_dict()
    missing = sorted(set(state) - set(received))
    if missing:
        raise KeyError(f"received weights lack {len(missing)} of the model's entries, e.g. {missing[:3]}")
    model.load_state_dict({k: received[k].to(state[k].dtype) for k in state})
    return model


def load_record(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    return load_state(model, arrays.to_torch_state_dict())


def npy_layout(key: str, data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an `.npy` payload declares, once they are known to match the bytes that came.

    `np.load` allocates what the header declares before it reads a byte of data, so a header of a few
    bytes claiming 2**40 floats would raise MemoryError (or take the memory) on the receiving side.
    """
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read_header = HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read_header(fp)
    except Exception as err:  # whatever a malformed header makes NumPy raise
        raise ArrayProblem(f"entry '{key}' cannot be read as a NumPy array: not a plain .npy payload ({err})") from err
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ArrayProblem(
            f"array '{key}' cannot be read as a NumPy array: not a plain NumPy array of numbers ({dtype})"
        )
    declared = math.prod(shape) * dtype.itemsize
    if declared != len(data) - fp.tell():
        raise ArrayProblem(
            f"array '{key}' declares {shape} x {dtype} = {declared} bytes but carries {len(data) - fp.tell()}"
        )
    return tuple(shape), dtype


def read_npy(key: str, data: bytes) -> np.ndarray:
    """One `.npy` payload (a model array, or one sent inside a ConfigRecord) as finite numbers, or ArrayProblem.

    The header is checked against the payload's size first (`npy_layout`); anything the reader raises after
    that still becomes an ArrayProblem, so no payload can make the caller fail in another way.
    """
    if not isinstance(data, bytes):
        raise ArrayProblem(f"entry '{key}' is {type(data).__name__}, not .npy bytes")
    npy_layout(key, data)
    try:
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        raise ArrayProblem(f"entry '{key}' cannot be read as a NumPy array: not a plain .npy payload ({err})") from err
    return _finite_numbers(key, value)


def non_finite(arrays: ArrayRecord) -> list[str]:
    """Keys of the floating-point arrays that hold NaN or Inf (the server's own arrays, already trusted as NumPy)."""
    return [k for k, a in arrays.items() if (v := a.numpy()).dtype.kind in "fc" and not np.isfinite(v).all()]


def _finite_numbers(key: str, value: np.ndarray) -> np.ndarray:
    if value.dtype.kind not in "biuf":
        raise ArrayProblem(f"array '{key}' holds {value.dtype}, not numbers")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise ArrayProblem(f"array '{key}' contains {NON_FINITE}")
    return value

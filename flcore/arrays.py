"""Reading model arrays that came over the network, on either side.

Both the client (the server's global model) and the server (each client's update) must refuse arrays
that do not fit the model before using them: wrong keys or shapes, payloads that are not plain numeric
NumPy arrays (Flower reads them with `np.load(allow_pickle=False)`, so nothing is unpickled), NaN or Inf.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord


class ArrayProblem(ValueError):
    """The arrays do not fit the expected model; the message says how."""


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
        if tuple(arrays[key].shape) != tuple(shape):
            raise ArrayProblem(f"array '{key}' has shape {tuple(arrays[key].shape)}, the model has {tuple(shape)}")
        try:
            value = arrays[key].numpy()
        except (TypeError, ValueError) as err:
            raise ArrayProblem(
                f"array '{key}' cannot be read as a NumPy array: not a plain NumPy array ({err})"
            ) from err
        if value.shape != tuple(shape):
            raise ArrayProblem(f"array '{key}' holds {value.shape}, not the model's shape")
        out[key] = _finite_numbers(key, value)
    return out


def read_npy(key: str, data: bytes) -> np.ndarray:
    """One `.npy` payload (an array sent inside a ConfigRecord) as finite numbers, or ArrayProblem."""
    try:
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except (TypeError, ValueError, OSError) as err:
        raise ArrayProblem(f"entry '{key}' cannot be read as a NumPy array: not a plain .npy payload ({err})") from err
    return _finite_numbers(key, value)


def non_finite(arrays: ArrayRecord) -> list[str]:
    """Keys of the floating-point arrays that hold NaN or Inf (the server's own arrays, already trusted as NumPy)."""
    return [k for k, a in arrays.items() if (v := a.numpy()).dtype.kind in "fc" and not np.isfinite(v).all()]


def _finite_numbers(key: str, value: np.ndarray) -> np.ndarray:
    if value.dtype.kind not in "biuf":
        raise ArrayProblem(f"array '{key}' holds {value.dtype}, not numbers")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise ArrayProblem(f"array '{key}' contains NaN or Inf")
    return value

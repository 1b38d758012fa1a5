"""Limits: clients refuse malformed or oversized server messages; nothing from a client is unpickled."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client_app.limits import MAX_CONFIG_STRING, MessageRejected, check_global
from flcore.class_statistics import npy_bytes
from flcore.models import build_model
from rounds.guard import screen

pytestmark = pytest.mark.usefixtures("flower_identity")


@pytest.fixture(scope="module")
def state():
    return build_model("resnet8", 16, 10, seed=0).state_dict()


def train_msg(arrays: ArrayRecord, config: ConfigRecord | None = None) -> Message:
    records = {"arrays": arrays, "config": config if config is not None else ConfigRecord({"server-round": 1})}
    return Message(RecordDict(records), dst_node_id=1, message_type="train")


def test_well_formed_global_model_is_accepted_as_tensors(state):
    got = check_global(train_msg(ArrayRecord(state)), state, 64.0)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_missing_records_are_refused(state):
    only_arrays = Message(RecordDict({"arrays": ArrayRecord(state)}), dst_node_id=1, message_type="train")
    with pytest.raises(MessageRejected, match="lacks a ConfigRecord 'config'"):
        check_global(only_arrays, state, 64.0)
    only_config = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="train")
    with pytest.raises(MessageRejected, match="lacks a ArrayRecord 'arrays'"):
        check_global(only_config, state, 64.0)


def test_wrong_keys_shapes_sizes_and_values_are_refused(state):
    key = "classifier.weight"
    with pytest.raises(MessageRejected, match="missing \\['classifier.weight'\\]"):
        check_global(train_msg(ArrayRecord({k: v for k, v in state.items() if k != key})), state, 64.0)
    with pytest.raises(MessageRejected, match="shape"):
        check_global(train_msg(ArrayRecord({**state, key: torch.zeros(3, 3)})), state, 64.0)
    with pytest.raises(MessageRejected, match="NaN or Inf"):
        check_global(train_msg(ArrayRecord({**state, key: torch.full_like(state[key], float("nan"))})), state, 64.0)
    with pytest.raises(MessageRejected, match="accepts at most 0.01 MB"):
        check_global(train_msg(ArrayRecord(state)), state, 0.01)
    with pytest.raises(MessageRejected, match="config entry 'junk'"):
        check_global(train_msg(ArrayRecord(state), ConfigRecord({"junk": "x" * 10_000})), state, 64.0)


def pickled_array(shape: tuple[int, ...]) -> Array:
    """An Array whose payload is a pickle (np.save with allow_pickle=True of an object array)."""

    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    buf = io.BytesIO()
    np.save(buf, np.array([Boom()] * int(np.prod(shape)), dtype=object).reshape(shape), allow_pickle=True)
    return Array(dtype="object", shape=tuple(shape), stype="numpy.ndarray", data=buf.getvalue())


def test_pickled_payloads_are_refused_on_both_sides(state, capsys):
    key = "classifier.bias"
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    arrays[key] = pickled_array(tuple(state[key].shape))
    with pytest.raises(MessageRejected, match="not a plain NumPy array"):
        check_global(train_msg(arrays), state, 64.0)
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=3, message_type="train")
    reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}), reply_to=request)
    checked = screen([reply], ArrayRecord(state))
    assert not checked.accepted and "cannot be read as a NumPy array" in checked.rejected[0][1]
    assert "unpickled!" not in capsys.readouterr().out


def test_array_payloads_in_config_are_checked_and_count_towards_the_size_budget(state):
    """CReFF sends its re-trained classifier as `.npy` bytes in the config: 512 x 10 floats exceed the string cap."""
    head = npy_bytes(np.ones((10, 512), np.float32))
    assert len(head) > MAX_CONFIG_STRING
    check_global(train_msg(ArrayRecord(state), ConfigRecord({"upload-head-weight": head})), state, 64.0)
    budget = (sum(v.numel() * v.element_size() for v in state.values()) + len(head) / 2) / 2**20
    with pytest.raises(MessageRejected, match="accepts at most"):
        check_global(train_msg(ArrayRecord(state), ConfigRecord({"upload-head-weight": head})), state, budget)
    nan = npy_bytes(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(MessageRejected, match="'head' contains NaN or Inf"):
        check_global(train_msg(ArrayRecord(state), ConfigRecord({"head": nan})), state, 64.0)
    with pytest.raises(MessageRejected, match="'blob' cannot be read as a NumPy array"):
        check_global(train_msg(ArrayRecord(state), ConfigRecord({"blob": pickled_array((2,)).data})), state, 64.0)

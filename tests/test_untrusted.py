"""No single party takes the run over: crafted replies are refused alone, claimed weights are bounded,
uploads have a size limit; the same holds on the client for the server's messages. Ends with a seeded
fuzz of both screens."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client_app.limits import MessageRejected, check_global
from flcore.class_statistics import npy_bytes
from flcore.config import ConfigError
from rounds import guard
from rounds.guard import screen
from rounds.policy import RoundPolicy
from rounds.weights import WeightCaps
from strategies.registry import build_strategy
from tests.helpers import begin_round, validated

pytestmark = pytest.mark.usefixtures("flower_identity")

GLOBAL = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}


def header(shape, descr="<f4", fortran=False, version=(1, 0)) -> bytes:
    buf = io.BytesIO()
    writer = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    writer(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def bomb(shape=(3,)) -> Array:
    """An Array whose metadata says `shape` but whose 128-byte `.npy` header declares 2**40 floats."""
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=header((2**40,)))


def reply(node: int, arrays: dict, n=1, uploads: ConfigRecord | None = None, **metrics) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    arrays = {k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()}
    records = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": n, "loss": 1.0, **metrics})}
    if uploads is not None:
        records["uploads"] = uploads
    return Message(RecordDict(records), reply_to=request)


def good(node: int, value: float = 1.0, n=1, **kw) -> Message:
    return reply(node, {"w": np.full(3, value, np.float32), "b": np.full(2, value, np.float32)}, n, **kw)


def arrays_of(state: dict) -> dict:
    return {k: Array(np.asarray(v)) for k, v in state.items()}


def policy(known=None, **caps) -> RoundPolicy:
    strategy = build_strategy(validated())
    guarded = RoundPolicy(strategy, weight_caps=WeightCaps(known=known or {}, **caps), max_upload_mb=1.0)
    begin_round(guarded, ArrayRecord(arrays_of(GLOBAL)))
    return guarded


def test_a_header_declaring_2_to_the_40_floats_rejects_that_reply_only():
    crafted = reply(9, {"w": bomb(), "b": Array(np.zeros(2, np.float32))})
    checked = screen([good(1), crafted, good(2)], ArrayRecord(arrays_of(GLOBAL)))
    assert [r.metadata.src_node_id for r in checked.accepted] == [1, 2]
    ((node, why),) = checked.rejected
    assert node == 9 and "declares (1099511627776,)" in why


def test_any_exception_while_reading_a_reply_rejects_it(monkeypatch):
    def explode(reply):
        if reply.metadata.src_node_id == 9:
            raise MemoryError("out of memory")
        return ("loss", "num-examples")

    monkeypatch.setattr(guard, "_metric_keys", explode)
    checked = screen([good(1), good(9), good(2)], ArrayRecord(arrays_of(GLOBAL)))
    assert len(checked.accepted) == 2 and checked.rejected == [(9, "unreadable reply (MemoryError: out of memory)")]


def server_message(arrays: dict, config: ConfigRecord | None = None) -> Message:
    records = {"arrays": ArrayRecord(arrays), "config": config if config is not None else ConfigRecord()}
    return Message(RecordDict(records), dst_node_id=1, message_type="train")


def test_the_client_refuses_a_crafted_header_from_the_server():
    state = {k: torch.from_numpy(v) for k, v in GLOBAL.items()}
    with pytest.raises(MessageRejected, match="declares"):
        check_global(server_message({"w": bomb(), "b": Array(GLOBAL["b"])}), state, 64.0)
    crafted_head = ConfigRecord({"upload-head-weight": header((2**40,))})
    with pytest.raises(MessageRejected, match="declares"):
        check_global(server_message(arrays_of(GLOBAL), crafted_head), state, 64.0)


def test_a_client_claiming_1e300_examples_weighs_its_partition_size():
    guarded = policy(known={0: 10, 1: 10})
    guarded.nodes.partition.update({1: 0, 9: 1})
    arrays, _ = guarded.aggregate_train(1, [good(1, 1.0, n=10), good(9, 100.0, n=1e300)])
    assert np.allclose(arrays["w"].numpy(), (1.0 * 10 + 100.0 * 10) / 20)


def test_a_node_of_unknown_size_weighs_at_most_ratio_times_the_lower_median():
    guarded = policy(max_ratio=2.0)
    replies = [good(1, 0.0, n=10), good(2, 0.0, n=10), good(9, 1.0, n=10**9)]
    arrays, _ = guarded.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 20 / 40)  # 10 + 10 + min(1e9, 2 x 10)


def test_max_examples_caps_every_claim():
    guarded = policy(max_examples=5)
    arrays, _ = guarded.aggregate_train(1, [good(1, 0.0, n=5), good(2, 1.0, n=10**6)])
    assert np.allclose(arrays["w"].numpy(), 0.5)


@pytest.mark.parametrize(("name", "expected"), [("fedmedian", 1.0), ("fedtrimmedavg", 1.0)])
def test_robust_strategies_ignore_one_far_away_update(name, expected):
    cfg = validated({"strategy": name, "trim-fraction": 0.2})
    guarded = RoundPolicy(build_strategy(cfg))
    begin_round(guarded, ArrayRecord(arrays_of(GLOBAL)))
    replies = [good(i, 1.0) for i in range(1, 5)] + [good(9, 1e6, n=10**6)]
    arrays, _ = guarded.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), expected)


def test_a_trimmed_mean_that_would_trim_nothing_is_refused_before_start():
    """Flower cuts int(trim-fraction x replies) per tail: 0.2 x 4 clients per round trims nothing."""
    from strategies.registry import check_strategy

    small = {"strategy": "fedtrimmedavg", "num-clients": 8, "fraction-train": 0.5, "trim-fraction": 0.2}
    with pytest.raises(ConfigError, match=r"'trim-fraction' = 0.2 is not allowed with 4 clients per round.*>= 0.25"):
        check_strategy(validated(small), None)
    check_strategy(validated({**small, "trim-fraction": 0.25}), None)
    check_strategy(validated({"strategy": "fedtrimmedavg"}), None)  # 0.2 x 8


def test_uploads_above_max_upload_mb_are_refused_before_they_are_decoded(monkeypatch):
    def never(key, data):
        raise AssertionError("an oversized upload was decoded")

    big = ConfigRecord({"covs": npy_bytes(np.zeros((600, 600), np.float32))})  # 1.4 MB
    monkeypatch.setattr(guard, "read_npy", never)
    checked = screen([good(1), good(9, uploads=big)], ArrayRecord(arrays_of(GLOBAL)), max_upload_mb=1.0)
    ((node, why),) = checked.rejected
    assert node == 9 and "exceed max-upload-mb = 1" in why


# --- fuzz: a few thousand seeded adversarial replies and server messages --------------------------------

# Eight bytes per item are sent: every descr here declares another item size, or holds no numbers.
DESCRS = ["<f4", ">f4", "<f2", "|u1", "|b1", "<c8", "|O", "<U3", "|V8", "<M8[s]", "xx", "<f4'"]


def fuzz_payload(rng: np.random.Generator, shape: tuple[int, ...], kinds: int = 9) -> bytes:
    """A `.npy` payload with at least one defect: header, dtype, declared size or values (or, as the last kind,
    another shape than `shape`, a defect only where the receiver knows the shape)."""
    kind = rng.integers(kinds)
    count = int(np.prod(shape))
    if count == 0:
        return header(shape) + rng.bytes(int(rng.integers(1, 9)))  # declares no data, carries some
    if kind == 0:  # random bytes
        return rng.bytes(int(rng.integers(0, 200)))
    if kind == 1:  # truncated valid payload
        data = npy_bytes(np.ones(shape, np.float32))
        return data[: int(rng.integers(0, len(data)))]
    if kind == 2:  # declared size far beyond the payload
        huge = tuple(int(x) for x in rng.choice([2**20, 2**31, 2**40, 2**62], size=rng.integers(1, 4)))
        return header(huge, version=[(1, 0), (2, 0)][rng.integers(2)]) + rng.bytes(int(rng.integers(0, 64)))
    if kind == 3:  # another dtype than numbers
        descr = DESCRS[rng.integers(len(DESCRS))]
        try:
            return header(shape, descr) + rng.bytes(count * 8)
        except Exception:
            return header(shape) + rng.bytes(count * 3 + 1)
    if kind == 4:  # negative or nonsensical shapes
        bad = [(-1,), (count, -count), ((2, 2),), ("3",), (2**70,)][rng.integers(5)]
        text = repr({"descr": "<f4", "fortran_order": False, "shape": bad}).encode()
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + rng.bytes(count * 4)
    if kind == 5:  # garbage header text, sometimes deeply nested
        text = b"(" * int(rng.integers(1, 3000)) if rng.random() < 0.3 else rng.bytes(int(rng.integers(1, 100)))
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text
    if kind == 6:  # unknown format version
        return b"\x93NUMPY" + bytes([int(rng.integers(3, 256)), 0]) + b"\x00\x00"
    if kind == 7:  # right layout, NaN or Inf inside
        values = rng.normal(size=shape).astype(np.float32)
        values.flat[int(rng.integers(count))] = [np.nan, np.inf, -np.inf][rng.integers(3)]
        return npy_bytes(values)
    return npy_bytes(np.ones(tuple(s + 1 for s in shape), np.float32))  # another shape than declared


def fuzz_metrics(rng: np.random.Generator) -> dict | None:
    """Metric values with at least one defect, or None to keep good metrics (and put the defect elsewhere)."""
    kind = rng.integers(7)
    weights = [0, -1, -1e300, float("nan"), float("inf"), -(2**62)]
    if kind == 0:
        return {"num-examples": weights[rng.integers(len(weights))], "loss": 1.0}
    if kind == 1:
        return {"loss": 1.0}  # no weight at all
    if kind == 2:
        return {"num-examples": 1, "loss": [float("nan"), float("inf")][rng.integers(2)]}
    if kind == 3:
        return {"num-examples": 1, "loss": [1.0, float("nan")]}
    if kind == 4:
        return {"num-examples": [1, 2], "loss": 1.0}
    return None


def fuzz_reply(rng: np.random.Generator, node: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    arrays = arrays_of({k: np.ones_like(v) for k, v in GLOBAL.items()})
    metrics = fuzz_metrics(rng)
    records: dict = {}
    if metrics is None:
        metrics = {"num-examples": 1, "loss": 1.0}
        key = ["w", "b"][rng.integers(2)]
        where = rng.integers(4)
        if where == 0:
            arrays[key] = Array(
                dtype="float32",
                shape=GLOBAL[key].shape,
                stype="numpy.ndarray",
                data=fuzz_payload(rng, GLOBAL[key].shape),
            )
        elif where == 1:
            shape = tuple(int(x) for x in rng.integers(0, 5, size=rng.integers(0, 3)))
            arrays[key] = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=fuzz_payload(rng, shape))
        elif where == 2 and rng.random() < 0.5:
            arrays["extra"] = Array(np.ones(1, np.float32))
        elif where == 2:
            arrays.pop(key)
        else:
            records["uploads"] = ConfigRecord({"means": fuzz_payload(rng, (2, 2))})
    records.update({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    if rng.random() < 0.05:
        records["second"] = ArrayRecord(arrays_of(GLOBAL))
    return Message(RecordDict(records), reply_to=request)


def test_fuzzed_replies_never_escape_the_screen_nor_reach_the_aggregate():
    rng = np.random.default_rng(2024)
    cases, guarded = 0, policy()
    for round_ in range(1500):
        honest = [good(1, 2.0), good(2, 2.0)]
        crafted = [fuzz_reply(rng, 100 + i) for i in range(int(rng.integers(1, 3)))]
        arrays, metrics = guarded.aggregate_train(round_ + 1, [honest[0], *crafted, honest[1]])
        cases += len(crafted)
        assert metrics["replies"] == 2 and metrics["rejected"] == len(crafted), metrics
        assert np.array_equal(arrays["w"].numpy(), np.full(3, 2.0, np.float32))
    assert cases >= 2000


def test_fuzzed_server_messages_are_refused_or_fit_the_model():
    rng = np.random.default_rng(7)
    state = {k: torch.from_numpy(v) for k, v in GLOBAL.items()}
    refused = 0
    for _ in range(2000):
        arrays = arrays_of({k: np.ones_like(v) for k, v in GLOBAL.items()})
        config = ConfigRecord({"server-round": 1})
        key = ["w", "b"][rng.integers(2)]
        if rng.random() < 0.7:
            arrays[key] = Array(
                dtype="float32",
                shape=GLOBAL[key].shape,
                stype="numpy.ndarray",
                data=fuzz_payload(rng, GLOBAL[key].shape),
            )
        else:
            config["upload-head-weight"] = fuzz_payload(rng, (2, 2), kinds=8)
        try:
            check_global(server_message(arrays, config), state, 1.0)
        except MessageRejected:
            refused += 1
            continue
        raise AssertionError(f"a defective message was accepted: {arrays[key].data!r} {dict(config)}")
    assert refused == 2000


def test_the_node_operator_can_lower_the_message_limit_the_server_sets():
    from client_app.app import message_limit

    cfg = validated({"max-message-mb": 1024.0})
    assert message_limit(cfg, {"partition-id": 0}) == 1024.0
    assert message_limit(cfg, {"partition-id": 0, "max-message-mb": 2}) == 2.0
    assert message_limit(cfg.with_(max_message_mb=1.0), {"max-message-mb": 64.0}) == 1.0


def test_a_max_upload_mb_too_small_for_the_strategy_is_refused_before_the_run():
    from server_app.preflight import check_upload_size

    cfg = validated({"strategy": "ccvr", "max-upload-mb": 1.0})
    with pytest.raises(ConfigError, match=r"'max-upload-mb' = 1.0 .*strategy=ccvr.*2\.5 MB.*256-d.*head=none"):
        check_upload_size(cfg, 10)  # CCVR's model: the classifier reads ResNet-8's 256-d features
    check_upload_size(cfg.with_(max_upload_mb=3.0), 10)
    with pytest.raises(ConfigError, match=r"10\.0 MB.*512-d"):  # the paper's MLP to projection-dim 512
        check_upload_size(cfg.with_(head="mlp", max_upload_mb=3.0), 10)
    check_upload_size(cfg.with_(strategy="fedavg"), 10)

"""Nodes holding their own data (client-data=local): each trains on exactly its folder, the server sees counts only."""

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from PIL import Image

from client_app.app import query_fn, train_fn
from client_app.private_errors import NodeFailure
from flcore import datasets as data
from flcore.config import ConfigError, validate
from flcore.local_data import CLASS_COUNTS_KEY, CLASSES_KEY, SKIPPED_KEY, LocalDataError, read_local
from flcore.models import run_model
from flcore.reports import read_metrics
from rounds.polling import PromptGrid
from rounds.sampling import NodeOrder, OrderedGrid
from server_app import app as server_app
from server_app import launch
from tests.helpers import ClientAppGrid, InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity", "one_thread")

CLASSES = data.DIGIT_NAMES
SIZE = 16


def digits_by_class() -> dict[str, torch.Tensor]:
    train = data.load("digits", "", SIZE).train
    return {name: train.images[torch.from_numpy(np.flatnonzero(train.labels == c))] for c, name in enumerate(CLASSES)}


DIGITS = digits_by_class()


def write_images(root, counts: dict[str, int], offset: int = 0) -> None:
    """`counts[name]` real digit scans of that class as PNG files under root/<name>/."""
    for name, n in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(offset, offset + n):
            pixels = DIGITS.get(name, DIGITS["zero"])[i].permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")


def local_cfg(tmp_path, **overrides):
    base = {
        "client-data": "local",
        "num-clients": 3,
        "fraction-train": 1.0,
        "num-server-rounds": 2,
        "local-epochs": 1,
        "align-per-class": 5,
        "round-timeout": 2.0,
        "output-dir": str(tmp_path / "out"),
    }
    return validate({**base, **overrides})


def request(cfg, server_round: int = 1, **config) -> Message:
    model = run_model(cfg, len(CLASSES), seed=0)
    record = ConfigRecord({"server-round": server_round, CLASSES_KEY: list(CLASSES), **config})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": record}), 1, "train")


def node(cfg, node_config: dict, node_id: int = 5) -> Context:
    return Context(1, node_id, node_config, RecordDict(), dict(cfg))


def test_a_node_trains_on_exactly_its_own_folder_and_reports_counts_only(tmp_path):
    write_images(tmp_path / "mine", {"zero": 4, "three": 7})
    cfg = local_cfg(tmp_path)
    reply = train_fn(request(cfg), node(cfg, {"data-dir": str(tmp_path / "mine")}))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 11
    assert metrics[CLASS_COUNTS_KEY] == [4, 0, 0, 7, 0, 0, 0, 0, 0, 0]
    assert set(reply.content.keys()) == {"arrays", "metrics"}  # no file names, no images


def test_a_changed_folder_is_read_as_it_is_now(tmp_path):
    root = tmp_path / "mine"
    write_images(root, {"one": 3, "two": 2})
    cfg = local_cfg(tmp_path)
    first = train_fn(request(cfg, 1), node(cfg, {"data-dir": str(root)})).content["metrics"]
    shutil.rmtree(root / "two")
    write_images(root, {"one": 2, "nine": 5}, offset=3)
    second = train_fn(request(cfg, 2), node(cfg, {"data-dir": str(root)})).content["metrics"]
    assert (first["num-examples"], first[CLASS_COUNTS_KEY][1:3]) == (5, [3, 2])
    assert second["num-examples"] == 10
    assert second[CLASS_COUNTS_KEY] == [0, 5, 0, 0, 0, 0, 0, 0, 0, 5]


def test_an_image_folder_under_train_and_hidden_folders_are_read(tmp_path):
    write_images(tmp_path / "copy" / "train", {"five": 3})
    (tmp_path / "copy" / "train" / ".cache").mkdir()
    found = read_local(tmp_path / "copy", CLASSES, SIZE)
    assert found.labels.tolist() == [5, 5, 5] and len(found.files) == 3


def test_an_hf_save_to_disk_copy_is_relabelled_with_the_servers_classes(tmp_path):
    import datasets

    names = ["seven", "one"]  # the copy's own order differs from the server's
    images = [
        Image.fromarray(DIGITS[n][i].permute(1, 2, 0).numpy()) for n, k in (("seven", 3), ("one", 2)) for i in range(k)
    ]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict({"img": images, "label": [0, 0, 0, 1, 1]}, features=features)
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "hf"))
    found = read_local(tmp_path / "hf", CLASSES, SIZE)
    assert found.labels.tolist() == [7, 7, 7, 1, 1] and tuple(found.images.shape) == (5, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("layout", "node_config", "match"),
    [
        ({"three": 2, "eleven": 1}, {}, r"'<data-dir>' has class\(es\) \['eleven'\] that the server does not know"),
        ({"cats": 2, "dogs": 1}, {}, r"'<data-dir>' has class\(es\) \['cats', 'dogs'\]"),
        ({}, {}, r"'<data-dir>' holds no images of the server's classes"),
        ({"four": 0}, {}, r"'<data-dir>' holds no images of the server's classes"),
        (None, {}, r"data-dir '<data-dir>' is not an existing folder"),
        ({"four": 2}, {"data-dir": None}, r"client-data = local.*start it with --node-config \"data-dir="),
    ],
    ids=["unknown-class", "no-server-class-names", "empty", "empty-class-folder", "missing-folder", "no-data-dir"],
)
def test_a_node_whose_folder_does_not_fit_the_servers_classes_is_refused_naming_it(
    tmp_path, layout, node_config, match
):
    root = tmp_path / "mine"
    if layout is not None:
        root.mkdir()
        write_images(root, layout)
    cfg = local_cfg(tmp_path)
    config = {"data-dir": str(root), **node_config}
    with pytest.raises((NodeFailure, LocalDataError), match=match) as refused:  # the server's copy: no folder named
        train_fn(request(cfg), node(cfg, {k: v for k, v in config.items() if v is not None}))
    assert str(tmp_path) not in str(refused.value)


def test_a_corrupt_cifar_copy_is_named(tmp_path):
    (tmp_path / "mine" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(LocalDataError, match=r"data-dir '.*mine' cannot be read"):
        read_local(tmp_path / "mine", CLASSES, SIZE)


def test_a_node_with_its_own_folder_is_refused_by_a_partitioned_run(tmp_path):
    write_images(tmp_path / "mine", {"zero": 2})
    cfg = validate({"num-clients": 2, "output-dir": str(tmp_path / "out")})
    own = {"data-dir": str(tmp_path / "mine"), "partition-id": 0, "num-partitions": 2}
    with pytest.raises(NodeFailure, match="data-dir = '<data-dir>'.*start the run with client-data = local"):
        train_fn(request(cfg), node(cfg, own))


def test_a_request_without_the_class_list_is_refused(tmp_path):
    write_images(tmp_path / "mine", {"zero": 2})
    cfg = local_cfg(tmp_path)
    msg = request(cfg)
    del msg.content["config"][CLASSES_KEY]
    with pytest.raises(NodeFailure, match="carries no class list"):
        train_fn(msg, node(cfg, {"data-dir": str(tmp_path / "mine")}))


def test_a_local_data_node_answers_with_its_name_not_a_partition(tmp_path):
    cfg = local_cfg(tmp_path)
    ask = Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), 1, "query")
    reply = query_fn(ask, node(cfg, {"data-dir": "/x", "node-name": "clinic-a", "partition-id": 3}))
    assert dict(reply.content["metrics"]) == {} and reply.content["config"]["node-name"] == "clinic-a"


def test_the_simulation_refuses_local_client_data(tmp_path, no_superlink, capsys):
    assert launch.run({"client-data": "local", "output-dir": str(tmp_path)}) == 2
    assert "'client-data' = 'local' is not allowed in the simulation" in capsys.readouterr().err


def test_clip2fl_with_the_holdout_teacher_needs_the_shared_dataset():
    with pytest.raises(ConfigError, match="align-teacher.*holdout.*client-data"):
        validate({"client-data": "local", "strategy": "clip2fl", "align-teacher": "holdout"})


def test_nodes_are_ordered_by_partition_then_name_then_node_id():
    names = {30: "zeta", 40: "alpha"}

    class Answers(InProcessGrid):
        def get_node_ids(self):
            return [50, 40, 30, 20, 10]

        def answer(self, msg):
            node_id = msg.metadata.dst_node_id
            content = RecordDict({"metrics": MetricRecord({"partition-id": 1} if node_id == 50 else {})})
            if node_id in names:
                content["config"] = ConfigRecord({"node-name": names[node_id]})
            return Message(content, reply_to=msg)

    order = NodeOrder()
    ids = OrderedGrid(PromptGrid(Answers()), order).get_node_ids()
    assert ids == [50, 40, 30, 10, 20]
    assert [order.label(n) for n in ids] == ["partition 1", "alpha", "zeta", "node 10", "node 20"]


class Federation(ClientAppGrid):
    """Nodes with their own folders, running the real ClientApp, whose membership changes between rounds.

    `folders[i]` is node i's data-dir (named `names[i]`); node i is online from the sampling of round
    `joins[i]` on; in round `leaves[i]` it takes the request and never answers, and it is gone until it is
    restarted for round `returns[i]` (same node ID, as a registered node keeps it); `changes[r]` runs
    after node 0 trained in round r (its folder changes between rounds).
    """

    def __init__(self, cfg, folders, names, joins, leaves, returns, changes):
        super().__init__(cfg)
        self.folders, self.names, self.joins, self.changes = folders, names, joins, changes
        self.leaves, self.returns = leaves, returns
        self.last = 0  # the last round whose training requests went out

    def online(self, node_id, server_round):
        away = self.leaves.get(node_id, 99) < server_round < self.returns.get(node_id, 99)
        return self.joins[node_id] <= server_round and not away

    def get_node_ids(self):
        return [i for i in range(len(self.folders)) if self.online(i, self.last + 1)]

    def answer(self, msg):
        node_id, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        server_round = int(msg.content["config"]["server-round"]) if kind == "train" else None
        self.last = max(self.last, server_round or 0)
        if server_round is not None and self.leaves.get(node_id) == server_round:
            return None  # gone mid-round: no reply ever comes
        own = {"data-dir": str(self.folders[node_id]), "node-name": self.names[node_id]}
        if kind == "train":
            self.configs.append(dict(msg.content["config"]))
        from client_app.app import app

        reply = app(msg, Context(1, node_id, own, RecordDict(), dict(self.cfg)))
        if node_id == 0 and server_round in self.changes:
            self.changes[server_round]()
        return reply

    def pull_messages(self, message_ids):
        self.outbox = [r for r in self.outbox if r is not None]
        return super().pull_messages(message_ids)


def test_a_federation_of_own_folders_survives_joins_departures_restarts_and_changed_folders(tmp_path):
    layouts = [{"zero": 6, "one": 4}, {"two": 3, "three": 9, "four": 2}, {"five": 5}, {"six": 4, "zero": 3}]
    names = ["alpha", "beta", "gamma", "delta"]
    folders = [tmp_path / "nodes" / n for n in names]
    for folder, layout in zip(folders, layouts, strict=True):
        write_images(folder, layout)
    cfg = local_cfg(tmp_path, **{"num-server-rounds": 4})
    grow = {1: lambda: write_images(folders[0], {"seven": 5})}  # alpha gains a class after round 1
    grid = Federation(cfg, folders, names, joins=[1, 1, 1, 2], leaves={2: 2}, returns={2: 4}, changes=grow)
    summary = server_app.run(grid, cfg, "local")
    run_dir = tmp_path / "out" / "local"
    rows = read_metrics(run_dir)
    # delta joins in round 2, gamma leaves during round 2 and is back (restarted) for round 4
    assert [(r["replies"], r["failed"]) for r in rows[1:]] == [(3, 0), (3, 1), (3, 0), (4, 0)]
    assert set(rows[4]["node-data"]) == {"alpha", "beta", "gamma", "delta"}
    assert rows[1]["node-data"]["alpha"] == {"num-examples": 10, CLASS_COUNTS_KEY: [6, 4] + [0] * 8, SKIPPED_KEY: 0}
    assert CLASS_COUNTS_KEY not in rows[1]  # taken out of the metrics before averaging
    assert rows[2]["node-data"]["alpha"]["num-examples"] == 15 and set(rows[2]["node-data"]) == {
        "alpha",
        "beta",
        "delta",
    }
    expected = {"alpha": 15, "beta": 14, "gamma": 5, "delta": 7}  # each node's latest report
    assert {k: v["num-examples"] for k, v in summary["node-data"].items()} == expected
    assert summary["pool-size"] == sum(expected.values())
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["nodes"] == sorted(expected) and np.sum(partition["clients"], axis=1).tolist() == [15, 14, 7, 5]
    assert all(c[CLASSES_KEY] == list(CLASSES) for c in grid.configs)
    written = "".join(p.read_text() for p in run_dir.iterdir() if p.suffix in (".json", ".jsonl"))
    assert str(tmp_path / "nodes") not in written and ".png" not in written  # counts only, never paths or files


def test_the_server_of_nodes_with_own_data_reads_only_its_test_split_and_align_folder(tmp_path, capsys):
    from flcore.run_data import prepare
    from flcore.server_data import server_data

    names = ("zero", "one", "two")
    write_images(tmp_path / "server" / "test", dict.fromkeys(names, 4))
    write_images(tmp_path / "align", dict.fromkeys(names, 6), offset=10)
    cfg = local_cfg(
        tmp_path, dataset="folder", **{"data-dir": str(tmp_path / "server"), "align-data": str(tmp_path / "align")}
    )
    assert not (tmp_path / "server" / "train").exists()  # the server has no training split at all
    prepared = prepare(cfg)
    assert (
        prepared.dataset.classes == tuple(sorted(names))
        and len(prepared.dataset.train) == 0
        and len(prepared.dataset.test) == 12
    )
    assert prepared.split.clients == [] and len(prepared.split.align) == 15  # align-per-class 5 of each class
    held = server_data(cfg)
    assert held.client_histogram.shape == (0, 3) and held.groups == {"many": [], "medium": [], "few": []}
    launch.check_before_start(cfg)  # every check before a run (server_app.preflight), then what runs
    assert "clients hold their own images (client-data=local) | D_align 15" in capsys.readouterr().out


def test_client_data_takes_partition_or_local():
    with pytest.raises(ConfigError, match="'client-data' = 'remote' is not allowed: choose one of partition, local"):
        validate({"client-data": "remote"})


# --- images a node cannot use, and what its errors tell the server ----------------------------------------


def unusable_images(root) -> None:
    """In root/zero/: a PNG beyond the (lowered) pixel budget, as a 14k x 14k one is beyond PIL's, a link to
    /etc/passwd and a directory, each named like an image."""
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "zero" / "huge.png")
    (root / "zero" / "passwd.png").symlink_to("/etc/passwd")
    (root / "zero" / "folder.png").mkdir()


@pytest.fixture
def checks_store(tmp_path, monkeypatch):
    """The image-check verdicts under this test's folder, and a pixel budget of 16 x 16 (the digits' size).

    Only the store moves: pointing the whole process's temporary directory into tmp_path also moves the
    socket a DataLoader worker opens to hand a batch back, and under pytest-xdist's longer tmp_path that
    path passes the 108-byte limit of a Unix socket: the batch is lost and training waits for ever."""
    from flcore import images, local_data

    store = partial(local_data.ImageChecks, store=tmp_path / "image-checks")
    monkeypatch.setattr(local_data, "ImageChecks", store)
    monkeypatch.setattr(images, "MAX_PIXELS", SIZE * SIZE)


@pytest.mark.usefixtures("checks_store")
def test_a_node_trains_on_the_images_it_can_read_and_reports_how_many_it_left_out(tmp_path):
    root = tmp_path / "mine"
    write_images(root, {"zero": 3, "one": 2})
    unusable_images(root)
    cfg = local_cfg(tmp_path)
    reply = train_fn(request(cfg), node(cfg, {"data-dir": str(root)}))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 5 and metrics[SKIPPED_KEY] == 3
    assert metrics[CLASS_COUNTS_KEY][:2] == [3, 2]


@pytest.mark.usefixtures("checks_store")
def test_each_image_is_decoded_once_until_it_changes(tmp_path, monkeypatch):
    from flcore import local_data

    root = tmp_path / "mine"
    write_images(root, {"zero": 3})
    decoded = []
    real = local_data.image_problem
    monkeypatch.setattr(local_data, "image_problem", lambda path: decoded.append(path) or real(path))
    assert len(read_local(root, CLASSES, SIZE)) == 3 and len(decoded) == 3
    assert len(read_local(root, CLASSES, SIZE)) == 3 and len(decoded) == 3  # a new process reads the verdicts
    (root / "zero" / "img001.png").write_bytes(b"not a png any more")
    assert len(read_local(root, CLASSES, SIZE)) == 2 and decoded[3:] == [str(root / "zero" / "img001.png")]


def test_an_error_reply_names_no_path_and_carries_no_traceback(tmp_path, monkeypatch):
    from client_app import app

    root = tmp_path / "mine"
    write_images(root, {"zero": 2})
    cfg = local_cfg(tmp_path)
    loader_error = (
        "Caught UnidentifiedImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        f'  File "/usr/lib/python3/site-packages/PIL/Image.py", line 3280, in open\n'
        f"PIL.UnidentifiedImageError: cannot identify image file '{root}/zero/img000.png'"
    )

    def crash(*args, **kwargs):
        raise RuntimeError(loader_error)

    monkeypatch.setattr(app, "train", crash)
    with pytest.raises(NodeFailure) as failed:
        train_fn(request(cfg), node(cfg, {"data-dir": str(root)}))
    text = str(failed.value)
    assert text == "RuntimeError on this node while handling the request; the node's log has the details"
    assert not failed.value.__cause__ and not failed.value.__context__ or failed.value.__suppress_context__


def test_public_reasons_replace_every_path():
    from client_app.private_errors import public_reason

    err = LocalDataError("node data-dir '/srv/x' cannot be read (OSError: /srv/x/a/b.png and /etc/y broke).\nmore")
    expected = "node data-dir '<data-dir>' cannot be read (OSError: <data-dir> and <path> broke)."
    assert public_reason(err, "/srv/x") == expected


def test_a_supernode_with_a_missing_or_imageless_data_dir_is_refused_when_it_starts(tmp_path, monkeypatch, capsys):
    from client_app import supernode

    started = []
    monkeypatch.setattr(supernode.os, "execv", lambda binary, args: started.append(args))
    assert supernode.main(["--insecure", "--node-config", "data-dir='/nonexistent'"]) == 2
    assert (
        capsys.readouterr().err
        == "error: node config data-dir '/nonexistent' is not an existing folder on this node.\n"
    )
    (tmp_path / "empty" / "zero").mkdir(parents=True)
    assert supernode.main(["--node-config", f"data-dir='{tmp_path / 'empty'}'"]) == 2
    assert "holds no usable image" in capsys.readouterr().err and started == []
    write_images(tmp_path / "mine", {"zero": 2})
    args = ["--insecure", "--node-config", f"data-dir='{tmp_path / 'mine'}' node-name='a'"]
    supernode.main(args)
    assert started[0][1:] == args and started[0][0].endswith("flower-supernode")
    assert "2 usable images, 0 image files left out" in capsys.readouterr().out
    supernode.main(["--insecure", "--node-config", "partition-id=0 num-partitions=2"])  # no data-dir: no check
    assert len(started) == 2

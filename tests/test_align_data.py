"""Where D_align comes from (`align-data`): the training split, ImageNet-LT's val split, or a server folder."""

import numpy as np
import pytest
from PIL import Image

from flcore.config import ConfigError, validate
from flcore.datasets import DataNotFound
from flcore.partition import class_groups
from flcore.run_data import prepare
from flcore.server_data import server_data

# A miniature ImageNet-LT: published training counts from head to tail, 5 val images per class.
TRAIN_COUNTS = [40, 25, 12, 6, 3, 2]
NAMES = ["tench", "goldfish", "shark", "hen", "ostrich", "robin"]
VAL_PER_CLASS = 5


def _png(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(path)


def imagenet_lt_tree(root):
    rng = np.random.default_rng(0)
    index = {"train": [], "val": [], "test": []}
    for c, n in enumerate(TRAIN_COUNTS):
        for split, count in (("train", n), ("val", VAL_PER_CLASS), ("test", 2)):
            folder = "train" if split == "train" else "val"
            for i in range(count):
                rel = f"{folder}/n{c:02d}/{split}_{i}.png"
                _png(root / rel, rng)
                index[split].append(f"{rel} {c}")
    for split, lines in index.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    return root


def config(root, **overrides):
    raw = {
        "dataset": "imagenet-lt",
        "data-dir": str(root),
        "imbalance-factor": 1.0,
        "image-size": 8,
        "num-clients": 4,
        "align-per-class": 4,
        "few-threshold": 5,
        "many-threshold": 20,
        **overrides,
    }
    return validate(raw, choices={"strategy": ["fedavg"]})


def test_auto_is_val_for_imagenet_lt_and_train_otherwise(tmp_path):
    cfg = config(imagenet_lt_tree(tmp_path))
    assert cfg["align-data"] == "auto" and cfg.align_source == "val"
    assert validate({}).align_source == "train"


def test_val_keeps_every_training_image_for_the_clients(tmp_path):
    cfg = config(imagenet_lt_tree(tmp_path))
    prep, data = prepare(cfg), server_data(cfg)
    labels = prep.dataset.train.labels
    assert data.pool_counts.tolist() == TRAIN_COUNTS  # no tail class gives up an image
    assert data.client_histogram.sum(axis=0).tolist() == TRAIN_COUNTS
    assert np.bincount(data.align.labels).tolist() == [4] * 6
    assert all("/val/" in f and "val_" in f for f in data.align.files)
    assert not set(data.align.files) & set(prep.dataset.train.files)
    assert data.groups == class_groups(np.bincount(labels), many=20, few=5)  # the published counts' groups
    assert not prep.split.align_from_train


@pytest.mark.parametrize("client_data", ["partition", "local"])
def test_train_is_refused_before_start_as_it_would_starve_the_tail(tmp_path, client_data):
    """Carved from ImageNet-LT's long-tailed training split, D_align would take every image of the classes
    with align-per-class images or fewer (here the last two) from the clients."""
    refusal = r"'align-data' = 'train' is not allowed for dataset 'imagenet-lt'.*expected auto or val"
    with pytest.raises(ConfigError, match=refusal):
        config(tmp_path, **{"align-data": "train", "client-data": client_data})


def test_a_server_folder_supplies_d_align(tmp_path):
    root = imagenet_lt_tree(tmp_path / "lt")
    rng = np.random.default_rng(1)
    for name in NAMES:
        for i in range(2):
            _png(tmp_path / "own" / name / f"{i}.png", rng)
    cfg = config(root, **{"align-data": str(tmp_path / "own")})
    data = server_data(cfg)
    assert data.pool_counts.tolist() == TRAIN_COUNTS
    assert np.bincount(data.align.labels).tolist() == [2] * 6
    assert all(f.startswith(str(tmp_path / "own")) for f in data.align.files)


def test_a_server_folder_must_name_exactly_the_dataset_classes(tmp_path):
    root = imagenet_lt_tree(tmp_path / "lt")
    rng = np.random.default_rng(1)
    for name in [*NAMES[:-1], "zebra"]:
        _png(tmp_path / "own" / name / "0.png", rng)
    with pytest.raises(ConfigError, match=r"'align-data'.*\['zebra'\] are not classes"):
        prepare(config(root, **{"align-data": str(tmp_path / "own")}))
    (tmp_path / "own" / "zebra" / "0.png").unlink()
    (tmp_path / "own" / "zebra").rmdir()
    with pytest.raises(ConfigError, match=r"'align-data'.*no images of 1 class.*robin"):
        prepare(config(root, **{"align-data": str(tmp_path / "own")}))


def test_missing_val_index_names_the_file(tmp_path):
    root = imagenet_lt_tree(tmp_path)
    (root / "ImageNet_LT_val.txt").unlink()
    with pytest.raises(DataNotFound, match="ImageNet_LT_val.txt"):
        prepare(config(root))

import numpy as np
import pytest
import torch
from PIL import Image

from flcore import data
from flcore.data import Batches, DataNotFound


def write_tree(root, splits=("train", "test"), classes=("cat", "dog"), per_class=3, size=10):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_digits_are_real_upsampled_and_split():
    ds = data.load("digits", "", 16)
    assert len(ds.train) + len(ds.test) == 1797
    assert ds.train.images.shape[1:] == (3, 16, 16) and ds.train.images.dtype == torch.uint8
    assert np.bincount(ds.test.labels).min() >= 50 and ds.classes[3] == "three"


def test_folder_dataset_reads_classes_and_decodes_on_demand(tmp_path):
    write_tree(tmp_path)
    ds = data.load("folder", str(tmp_path), 8)
    assert ds.classes == ("cat", "dog") and len(ds.train) == 6 and ds.train.files is not None
    x, y = next(Batches(ds.train, ds, 8, 4).iterate())
    assert x.shape == (4, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.tolist() == [0, 0, 0, 1]


def test_folder_without_splits_says_what_is_missing(tmp_path):
    with pytest.raises(DataNotFound, match="train"):
        data.load("folder", str(tmp_path), 8)


def test_imagenet_lt_reads_published_index_layout(tmp_path):
    write_tree(tmp_path, splits=("train", "val"), classes=("n01", "n02"), per_class=2)
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/n01/0.png 0\ntrain/n01/1.png 0\ntrain/n02/0.png 1\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("val/n01/0.png 0\nval/n02/1.png 1\n")
    ds = data.load("imagenet-lt", str(tmp_path), 8)
    assert ds.train.labels.tolist() == [0, 0, 1] and len(ds.test) == 2
    assert data.decode(ds.test.files, 8).shape == (2, 3, 8, 8)


def test_imagenet_lt_bad_index_line_is_named(tmp_path):
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/a.png 0\nbroken-line\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("")
    with pytest.raises(ValueError, match="ImageNet_LT_train.txt:2"):
        data.load("imagenet-lt", str(tmp_path), 8)


def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(DataNotFound, match="cifar-100-python"):
        data.load("cifar100", str(tmp_path), 32)


def test_batches_cover_the_set_once_and_augment_reproducibly():
    ds = data.load("digits", "", 16)
    part = ds.train.subset(np.arange(70))
    batches = Batches(part, ds, 16, 32)
    seen = torch.cat([y for _, y in batches.iterate(shuffle=True, gen=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(part.labels.tolist()) and len(batches) == 3
    a = [x for x, _ in batches.iterate(shuffle=True, augment=True, gen=torch.Generator().manual_seed(5))]
    b = [x for x, _ in batches.iterate(shuffle=True, augment=True, gen=torch.Generator().manual_seed(5))]
    plain = next(batches.iterate())[0]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert abs(float(plain.mean())) < 2 and a[0].shape == plain.shape

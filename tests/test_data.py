import numpy as np
import pytest
import torch
from PIL import Image

from flcore import datasets as data
from flcore.batches import Batches, eval_resize
from flcore.datasets import DataNotFound, ImageSet


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
    assert next(Batches(ds.test, ds, 8, 2).iterate())[0].shape == (2, 3, 8, 8)


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


def file_set(tmp_path, count=10, size=(12, 20)):
    """`count` random images of height x width `size`, two classes, as a file-backed training split."""
    rng = np.random.default_rng(1)
    files = []
    for i in range(count):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    images = ImageSet(np.arange(count, dtype=np.int64) % 2, files=tuple(files))
    return images, data.Dataset(images, images, ("a", "b"), (0.5,) * 3, (0.5,) * 3, natural=True)


def run_epoch(batches, seed):
    out = list(batches.iterate_indexed(shuffle=True, augment=True, gen=torch.Generator().manual_seed(seed)))
    return torch.cat([i for i, _, _ in out]), torch.cat([x for _, x, _ in out]), torch.cat([y for _, _, y in out])


def test_file_batches_keep_the_seeded_order_and_augment_alike_with_any_number_of_loader_processes(tmp_path):
    from flcore.device import Compute

    images, dataset = file_set(tmp_path)
    in_process = Batches(images, dataset, 8, 3)
    loaders = Batches(images, dataset, 8, 3, Compute(torch.device("cpu"), workers=2))
    order, x, y = run_epoch(in_process, seed=4)
    assert torch.equal(order, torch.randperm(10, generator=torch.Generator().manual_seed(4)))  # today's order
    assert torch.equal(y, torch.from_numpy(images.labels)[order]) and x.shape == (10, 3, 8, 8)
    again, x_loaders, _ = run_epoch(loaders, seed=4)
    assert torch.equal(again, order) and torch.equal(x_loaders, x)
    _, other, _ = run_epoch(in_process, seed=5)
    assert not torch.equal(other, x)


def test_file_test_transform_crops_the_centre_instead_of_squashing(tmp_path):
    """ImageNet's test transform: shorter side to 256/224 of the input size, then the centre crop."""
    pixels = np.full((10, 40, 3), 255, dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # a red left quarter, outside the centre crop of a wide image
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    images = ImageSet(np.zeros(1, dtype=np.int64), files=(str(tmp_path / "wide.png"),))
    dataset = data.Dataset(images, images, ("a",), (0.0,) * 3, (1 / 255,) * 3, natural=True)
    x, _ = next(Batches(images, dataset, 8, 1).iterate())
    assert x.shape == (1, 3, 8, 8) and eval_resize(224) == 256
    assert float(x[0, 1].min()) > 250  # green is full everywhere: no red pixel was kept


def test_image_files_lists_images_at_any_depth_by_suffix_in_any_case(tmp_path):
    from flcore.images import image_files

    for name in ("b/deep/x.PNG", "a.jpg", "notes.txt", "b/y.jpeg", ".hidden/z.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listed = [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)]
    assert listed == [".hidden/z.png", "a.jpg", "b/deep/x.PNG", "b/y.jpeg"]

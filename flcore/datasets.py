"""Local datasets as decoded uint8 tensors or image files, with one loader per dataset name.

Nothing is downloaded: `digits` ships with scikit-learn, every other dataset is read from `data-dir`,
and a missing copy raises `DataNotFound` saying what to put where.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flcore.config import ConfigError
from flcore.images import image_files

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEST_FRACTION = 0.3
Stats = tuple[tuple[float, float, float], tuple[float, float, float], bool]
# Per dataset: the input mean and std (of 0..1 pixels) and whether its images may be flipped (natural photos:
# yes; digits: no). A node holding its own images normalises them like the server's dataset of that name.
INPUT_STATS: dict[str, Stats] = {
    "digits": ((0.5,) * 3, (0.5,) * 3, False),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "imagenet-lt": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True),
    "folder": ((0.5,) * 3, (0.5,) * 3, True),
}


# Datasets decoded into memory at the model's input size when loaded, with the images a process holds at the
# peak of loading them: digits' 1,797 twice (the decoded set, and the train and test sets cut from it), CIFAR's
# 60,000 once (each split decoded on its own). The preflight sizes them before decoding anything; the other
# datasets are decoded on demand from files.
IN_MEMORY_IMAGES: dict[str, int] = {"digits": 2 * 1797, "cifar10": 60_000, "cifar100": 60_000}
RESIZE_CHUNK_BYTES = 2**28


class DataNotFound(FileNotFoundError):
    """A dataset's local copy is missing; the message says where to put it."""


@dataclass(frozen=True)
class ImageSet:
    """Labelled images: decoded uint8 NCHW tensors at the model's input size, or files decoded on demand."""

    labels: np.ndarray
    images: torch.Tensor | None = None
    files: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls) -> ImageSet:
        """No images (the training split of a server whose clients hold their own data)."""
        return cls(np.zeros(0, dtype=np.int64), files=())

    def subset(self, idx: np.ndarray) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        images = self.images[torch.from_numpy(idx)] if self.images is not None else None
        files = tuple(self.files[i] for i in idx) if self.files is not None else None
        return ImageSet(self.labels[idx], images, files)


@dataclass(frozen=True)
class Dataset:
    """A dataset's train and test splits, class names and input statistics."""

    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    natural: bool  # natural photos may be flipped; digits may not

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 NCHW batch once at load time, so training never resizes. A chunk of images at a time goes
    through float32 (at most RESIZE_CHUNK_BYTES): the whole set at once would hold eight times the result."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    step = max(1, RESIZE_CHUNK_BYTES // (images.shape[1] * size * size * 4))
    for start in range(0, len(images), step):
        chunk = images[start : start + step].float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + step] = chunk.round_().clamp_(0, 255)
    return out


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.extend(idx[: round(len(idx) * fraction)])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 8x8 scans (0..255) and their labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8), bunch.target.astype(np.int64)


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in scikit-learn's order) of the digits' fixed stratified 70/30 train and test splits."""
    return _stratified_split(labels, DIGITS_TEST_FRACTION, seed=0)


def load_digits(data_dir: Path, image_size: int) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 real scans), upsampled to the model input, fixed 70/30 split."""
    scans, labels = digits_pixels()
    pixels = torch.from_numpy(scans)
    images = resize(pixels[:, None].expand(-1, 3, -1, -1), image_size)
    train, test = digits_split(labels)
    full = ImageSet(labels, images)
    return Dataset(full.subset(train), full.subset(test), DIGIT_NAMES, *INPUT_STATS["digits"])


def _cifar_from_torchvision(root: Path, num_classes: int, image_size: int) -> tuple[ImageSet, ImageSet, tuple]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    splits = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        images = resize(torch.from_numpy(ds.data).permute(0, 3, 1, 2), image_size)
        splits.append(ImageSet(np.asarray(ds.targets, dtype=np.int64), images))
    return splits[0], splits[1], tuple(ds.classes)


def _cifar_from_hf_disk(root: Path, num_classes: int, image_size: int) -> tuple[ImageSet, ImageSet, tuple]:
    import datasets

    dd = datasets.load_from_disk(str(root))
    label_col = "label" if num_classes == 10 else "fine_label"
    splits = []
    for name in ("train", "test"):
        ds = dd[name].with_format("numpy")
        pixels = np.stack([np.asarray(img.convert("RGB")) for img in dd[name]["img"]])
        images = resize(torch.from_numpy(pixels).permute(0, 3, 1, 2), image_size)
        splits.append(ImageSet(np.asarray(ds[label_col], dtype=np.int64), images))
    classes = tuple(dd["train"].features[label_col].names)
    return splits[0], splits[1], classes


def _unless_corrupt(
    read: Callable, data_dir: Path, part: str, num_classes: int, image_size: int
) -> tuple[ImageSet, ImageSet, tuple]:
    """`read(data_dir, ...)`, with a broken copy in `data_dir / part` (empty folder, truncated batch, bad JSON)
    named as such: torchvision answers those with "use download=True", and nothing is downloaded here."""
    try:
        return read(data_dir, num_classes, image_size)
    except Exception as err:
        reason = (
            "torchvision's integrity check failed" if "download=True" in str(err) else f"{type(err).__name__}: {err}"
        )
        raise DataNotFound(
            f"CIFAR-{num_classes} in '{(data_dir / part).resolve()}' is incomplete or corrupt ({reason}); replace it "
            "with an intact copy (nothing is downloaded)."
        ) from err


def load_cifar(num_classes: int) -> Callable[[Path, int], Dataset]:
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"

    def load(data_dir: Path, image_size: int) -> Dataset:
        if (data_dir / folder).is_dir():
            train, test, classes = _unless_corrupt(_cifar_from_torchvision, data_dir, folder, num_classes, image_size)
        elif (data_dir / "dataset_dict.json").is_file():
            train, test, classes = _unless_corrupt(_cifar_from_hf_disk, data_dir, ".", num_classes, image_size)
        else:
            raise DataNotFound(
                f"CIFAR-{num_classes} not found in data-dir '{data_dir}'. Put torchvision's '{folder}' folder there "
                f"(torchvision.datasets.CIFAR{num_classes}(root='{data_dir}', download=True) on a machine with "
                f"internet), or an HF dataset saved with save_to_disk (load_dataset('uoft-cs/cifar{num_classes}')"
                f".save_to_disk('{data_dir}'))."
            )
        return Dataset(train, test, classes, *INPUT_STATS[f"cifar{num_classes}"])

    return load


def _read_index(root: Path, name: str) -> ImageSet:
    path = root / name
    if not path.is_file():
        raise DataNotFound(
            f"ImageNet-LT index '{path}' is missing. Put ImageNet_LT_train.txt and ImageNet_LT_test.txt (and "
            "ImageNet_LT_val.txt for align-data=val; all published with Liu et al., 'Large-Scale Long-Tailed "
            "Recognition in an Open World') in data-dir, next to the ImageNet 'train/' and 'val/' image folders "
            "they point into."
        )
    files, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{lineno}: expected '<relative image path> <class index>', got {line!r}")
        files.append(str(root / parts[0]))
        labels.append(int(parts[1]))
    return ImageSet(np.asarray(labels, dtype=np.int64), files=tuple(files))


def _imagenet_lt(data_dir: Path, train: ImageSet, test: ImageSet) -> Dataset:
    num_classes = int(max(train.labels.max(initial=-1), test.labels.max(initial=-1))) + 1
    names_file = data_dir / "classnames.txt"
    classes = (
        tuple(names_file.read_text().splitlines())
        if names_file.is_file()
        else tuple(f"class {c}" for c in range(num_classes))
    )
    return Dataset(train, test, classes, *INPUT_STATS["imagenet-lt"])


def load_imagenet_lt(data_dir: Path, image_size: int) -> Dataset:
    """ImageNet-LT from its published index files; images are decoded on demand (too large for memory)."""
    train = _read_index(data_dir, "ImageNet_LT_train.txt")
    return _imagenet_lt(data_dir, train, _read_index(data_dir, "ImageNet_LT_test.txt"))


def load_imagenet_lt_test(data_dir: Path, image_size: int) -> Dataset:
    """ImageNet-LT's test split alone (a server whose clients hold their own images needs no training index)."""
    return _imagenet_lt(data_dir, ImageSet.empty(), _read_index(data_dir, "ImageNet_LT_test.txt"))


def class_subfolders(root: Path) -> list[str]:
    """Names of the class subfolders of `root`, sorted; hidden folders (`.cache`, `.ipynb_checkpoints`) are not
    classes."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(split_dir: Path, classes: tuple[str, ...]) -> ImageSet:
    """Image files under split_dir/<class name>/ (recursively), labelled by the class's position in `classes`."""
    files, labels = [], []
    for c, name in enumerate(classes):
        found = image_files(split_dir / name)
        files.extend(str(path) for path in found)
        labels.extend([c] * len(found))
    return ImageSet(np.asarray(labels, dtype=np.int64), files=tuple(files))


def load_folder(data_dir: Path, image_size: int) -> Dataset:
    """Any ImageFolder tree: data-dir/train/<class>/*.png and data-dir/test/<class>/*.png."""
    train_dir, test_dir = data_dir / "train", data_dir / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataNotFound(f"folder dataset needs '{train_dir}' and '{test_dir}', each with one subfolder per class.")
    classes = tuple(class_subfolders(train_dir))
    orphans = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if orphans:
        raise DataNotFound(
            f"folder dataset: class folder(s) {orphans[:5]} in '{test_dir}' have no twin in '{train_dir}'; their test "
            "images would be dropped. Add the class to train/ or remove it from test/."
        )
    train, test = scan_folder(train_dir, classes), scan_folder(test_dir, classes)
    if len(train) == 0 or len(test) == 0:
        raise DataNotFound(f"folder dataset under '{data_dir}' has no images in train/ or test/.")
    refuse_empty_classes(train, classes, train_dir)
    return Dataset(train, test, classes, *INPUT_STATS["folder"])


def refuse_empty_classes(train: ImageSet, classes: tuple[str, ...], train_dir: Path) -> None:
    """A class folder without a training image would still be a class of the model, evaluated on its test
    images and missing from D_align, and the run would say nothing: refuse it, naming the folder."""
    counts = np.bincount(train.labels, minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataNotFound(
            f"folder dataset: class folder(s) {empty[:5]} in '{train_dir}' hold no images ({len(empty)} such); "
            "every class needs training images. Add images to them or remove the class from train/ and test/."
        )


def load_folder_test(data_dir: Path, image_size: int) -> Dataset:
    """An ImageFolder tree's test split alone (data-dir/test/<class>/*): the classes are its subfolders."""
    test_dir = data_dir / "test"
    if not test_dir.is_dir():
        raise DataNotFound(f"folder dataset needs '{test_dir}', with one subfolder per class.")
    classes = tuple(class_subfolders(test_dir))
    test = scan_folder(test_dir, classes)
    if len(test) == 0:
        raise DataNotFound(f"folder dataset under '{data_dir}' has no images in test/.")
    return Dataset(ImageSet.empty(), test, classes, *INPUT_STATS["folder"])


def _require_classes(found: ImageSet, classes: tuple[str, ...], where: str) -> ImageSet:
    """Refuse a D_align source that lacks a class or names one the dataset does not have."""
    counts = np.bincount(found.labels, minlength=len(classes))
    if len(counts) > len(classes):
        raise ConfigError(
            f"run-config key 'align-data': {where} has class ids up to {len(counts) - 1}, but the dataset has "
            f"{len(classes)} classes."
        )
    missing = [classes[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise ConfigError(
            f"run-config key 'align-data': {where} has no images of {len(missing)} class(es), e.g. "
            f"{missing[:5]}; D_align needs every class."
        )
    return found


def class_folder(root: Path, classes: tuple[str, ...]) -> ImageSet:
    """The server's own images: root/<class name>/*, every subfolder named after one of `classes`."""
    found = class_subfolders(root)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(
            f"run-config key 'align-data' = '{root}': subfolder(s) {unknown[:5]} are not classes of the dataset; "
            f"expected subfolders named after its classes, e.g. {list(classes[:5])}."
        )
    return _require_classes(scan_folder(root, classes), classes, f"folder '{root}'")


def align_images(source: str, data_dir: str, classes: tuple[str, ...]) -> ImageSet | None:
    """The set D_align is drawn from, for a resolved `align-data`: None for train (D_align is then carved
    from the training split), ImageNet-LT's published val index for val, else a folder of class subfolders."""
    if source == "train":
        return None
    if source == "val":
        index = "ImageNet_LT_val.txt"
        return _require_classes(_read_index(Path(data_dir).expanduser(), index), classes, f"'{index}'")
    return class_folder(Path(source).expanduser(), classes)


LOADERS: dict[str, Callable[[Path, int], Dataset]] = {
    "digits": load_digits,
    "cifar10": load_cifar(10),
    "cifar100": load_cifar(100),
    "imagenet-lt": load_imagenet_lt,
    "folder": load_folder,
}


# Datasets whose test split can be read without the training split: a server whose clients hold their own
# images and whose D_align is not carved from the training split reads no more than it must.
TEST_ONLY_LOADERS: dict[str, Callable[[Path, int], Dataset]] = {
    "imagenet-lt": load_imagenet_lt_test,
    "folder": load_folder_test,
}


def load(name: str, data_dir: str, image_size: int, with_train: bool = True) -> Dataset:
    """The named dataset; with `with_train=False` its training split may be left unread (then it is empty)."""
    loader = LOADERS[name] if with_train else TEST_ONLY_LOADERS.get(name, LOADERS[name])
    return loader(Path(data_dir).expanduser(), image_size)

"""A SuperNode's own images (client-data=local), labelled with the server's classes and read as they are now.

In a real federation each party holds its own images: a hospital's folder, a phone's gallery, of different
sizes and with no common copy. Such a node is started with `--node-config "data-dir='/path/to/images'"`
and trains on exactly those images: no long tail is cut and no split is drawn. The class list is the
server's (sent with every request): the node maps its class names onto the server's indices. A class the
server does not know, or a folder with none of the server's classes, is refused with an error naming the
folder; classes the folder lacks are fine (that is the heterogeneity federated learning is about).

The folder is read afresh on every request (a directory listing for an image folder), so images added
or removed between rounds are trained on as they are now. Three layouts are read:

- an ImageFolder tree: `<data-dir>/<class>/**/*.png` (or `<data-dir>/train/<class>/...`);
- torchvision's CIFAR folder (`cifar-10-batches-py` or `cifar-100-python` in data-dir): its train split;
- an HF dataset saved with `save_to_disk` (its `train` split, or its only one): labels from its
  ClassLabel column, images from its Image column.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flcore.datasets import DataNotFound, ImageSet, class_subfolders, resize, scan_folder

CLASSES_KEY = "classes"  # request config to a node holding its own data: the server's class names, in order
CLASS_COUNTS_KEY = "class-counts"  # train metric of a node holding its own data: its images per server class
CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")
HF_MARKERS = ("dataset_dict.json", "dataset_info.json")
Named = tuple[ImageSet, tuple[str, ...]]  # images labelled by position in the copy's own class names


class LocalDataError(DataNotFound):
    """A node's own data folder is missing, unreadable or labelled with classes the server does not know."""


def _image_folder(root: Path, classes: tuple[str, ...], image_size: int) -> Named:
    """root/<class>/..., or root/train/<class>/... when `train` is no class name (the `folder` dataset's layout)."""
    base = root / "train" if (root / "train").is_dir() and "train" not in classes else root
    names = tuple(class_subfolders(base))
    return scan_folder(base, names), names


def _cifar_copy(root: Path, classes: tuple[str, ...], image_size: int) -> Named:
    from torchvision.datasets import CIFAR10, CIFAR100

    kind = CIFAR10 if (root / CIFAR_FOLDERS[0]).is_dir() else CIFAR100
    ds = kind(str(root), train=True, download=False)
    images = resize(torch.from_numpy(ds.data).permute(0, 3, 1, 2), image_size)
    return ImageSet(np.asarray(ds.targets, dtype=np.int64), images), tuple(ds.classes)


def _hf_copy(root: Path, classes: tuple[str, ...], image_size: int) -> Named:
    import datasets
    from PIL import Image

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise LocalDataError(f"node data-dir '{root}': the saved dataset has splits {list(loaded)} and no 'train'.")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    features = loaded.features
    label = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    image = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if label is None or image is None:
        raise LocalDataError(
            f"node data-dir '{root}': the saved dataset needs a ClassLabel and an Image column; it has "
            f"{dict(features)}."
        )
    size = (image_size, image_size)
    pixels = [np.asarray(img.convert("RGB").resize(size, Image.BILINEAR)) for img in loaded[image]]
    stacked = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    labels = np.asarray(loaded[label], dtype=np.int64)
    return ImageSet(labels, torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()), tuple(features[label].names)


def _reader(root: Path) -> Callable[[Path, tuple[str, ...], int], Named]:
    if any((root / name).is_dir() for name in CIFAR_FOLDERS):
        return _cifar_copy
    if any((root / name).is_file() for name in HF_MARKERS):
        return _hf_copy
    return _image_folder


def _to_server_classes(found: ImageSet, names: tuple[str, ...], classes: tuple[str, ...], root: Path) -> ImageSet:
    """`found` relabelled from its own class names to the server's indices; refused if a name is unknown or no
    image is left."""
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise LocalDataError(
            f"node data-dir '{root}' has class(es) {unknown[:5]} that the server does not know; the server's "
            f"classes are {list(classes[:10])}{' ...' if len(classes) > 10 else ''}. Rename or remove them."
        )
    index = np.asarray([classes.index(n) for n in names], dtype=np.int64)
    relabelled = ImageSet(index[found.labels] if len(found) else found.labels, found.images, found.files)
    if len(relabelled) == 0:
        raise LocalDataError(
            f"node data-dir '{root}' holds no images of the server's classes: expected one subfolder per class, "
            f"named after the server's classes (e.g. {list(classes[:5])}), with image files "
            "(.png, .jpg, ...) in them."
        )
    return relabelled


def read_local(root: Path, classes: tuple[str, ...], image_size: int) -> ImageSet:
    """This node's images as they are now, labelled with the server's class indices (see the module docstring)."""
    root = root.expanduser()
    if not root.is_dir():
        raise LocalDataError(f"node config data-dir '{root}' is not an existing folder on this node.")
    reader = _reader(root)
    try:
        found, names = reader(root, classes, image_size)
    except LocalDataError:
        raise
    except Exception as err:  # a truncated CIFAR batch, a broken saved dataset: name the folder, not a traceback
        raise LocalDataError(f"node data-dir '{root}' cannot be read ({type(err).__name__}: {err}).") from err
    return _to_server_classes(found, names, classes, root)


def class_counts(images: ImageSet, num_classes: int) -> list[int]:
    """Images per server class: the only thing about its data a node reports besides its size."""
    return np.bincount(images.labels, minlength=num_classes).astype(int).tolist()

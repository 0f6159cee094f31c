"""CIFAR-10 in its python format: a reader that runs no code from the pickles, a writer, and the data module."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from nas.data.base import DataError, ImageDataModule, _require_dir

__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR10Arrays",
    "CIFAR10DataModule",
    "ImageArrayDataset",
    "read_cifar10_format",
    "write_cifar10_format",
]

log = logging.getLogger(__name__)


# The folder inside cifar-10-python.tar.gz and its files, as torchvision's CIFAR10 dataset reads them.
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
# MD5 sums of the files in the official archive, the values torchvision 0.29 checks.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_FIX = (
    f"Extract cifar-10-python.tar.gz into data.root so that data.root/{CIFAR10_FOLDER}/ contains "
    f"{', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE} and {CIFAR10_META_FILE}."
)


class _CIFAR10Unpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 file needs, so a crafted file cannot run code.

    Every global that a pickle names goes through ``find_class``, so the only callables a file can reach
    are numpy's array and dtype constructors, ``_codecs.encode`` and the methods of the objects they
    build. Object arrays still load, but the reader accepts only uint8 pixel data and integer labels.
    """

    ALLOWED_GLOBALS = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # numpy 1.x arrays, as in the official files
            ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x arrays
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def __init__(self, file: io.BytesIO, path: Path) -> None:
        # The official files were pickled by Python 2. latin1 turns its byte strings into str without
        # changing a byte, which is how numpy reads the raw array data back.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise DataError(
                f"{self.path} refers to the global {module}.{name}, which a CIFAR-10 file never contains, "
                f"so it was not loaded. Replace it with the file from the official archive. {_CIFAR10_FIX}"
            )
        return super().find_class(module, name)


def _as_text(key: Any) -> Any:
    return key.decode("latin1") if isinstance(key, bytes) else key


def _unpickle_cifar10_file(path: Path, unofficial: list[str]) -> dict[str, Any]:
    """Check the MD5 sum of one CIFAR-10 file and unpickle it into a dict with str keys.

    The file's name is appended to ``unofficial`` when its MD5 sum is not the official one.
    """
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path} is missing. {_CIFAR10_FIX}")
    payload = path.read_bytes()

    digest = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    if digest != CIFAR10_MD5[path.name]:
        unofficial.append(path.name)

    try:
        content = _CIFAR10Unpickler(io.BytesIO(payload), path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError) as err:
        raise DataError(f"CIFAR-10 file {path} is not a readable pickle ({type(err).__name__}: {err}). "
                        f"{_CIFAR10_FIX}") from err
    if not isinstance(content, dict):
        raise DataError(f"CIFAR-10 file {path} contains a {type(content).__name__}, but a dict was expected. "
                        f"{_CIFAR10_FIX}")
    return {_as_text(key): value for key, value in content.items()}


def _require_entry(content: dict[str, Any], key: str, path: Path) -> Any:
    if key not in content:
        raise DataError(f"CIFAR-10 file {path} has no {key!r} key (its keys are {sorted(map(str, content))}). "
                        f"{_CIFAR10_FIX}")
    return content[key]


def _read_cifar10_batch(path: Path, unofficial: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file into N x 32 x 32 x 3 uint8 images (height, width, RGB) and N int64 labels."""
    content = _unpickle_cifar10_file(path, unofficial)
    data = _require_entry(content, "data", path)
    labels = _require_entry(content, "labels", path)

    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR-10 file {path} has 'data' as a {found}, but N x 3072 uint8 was expected. "
                        f"{_CIFAR10_FIX}")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"CIFAR-10 file {path} has {labels.dtype} labels of shape {labels.shape}, but {len(data)} "
                        f"integers were expected. {_CIFAR10_FIX}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 file {path} has labels from {labels.min()} to {labels.max()}, outside 0..9. "
                        f"{_CIFAR10_FIX}")

    # Each row is channel-major: 1024 red, then 1024 green, then 1024 blue values, each plane row by row.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _read_cifar10_classes(path: Path, unofficial: list[str]) -> tuple[str, ...]:
    names = _require_entry(_unpickle_cifar10_file(path, unofficial), "label_names", path)
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"CIFAR-10 file {path} must list 10 class names under 'label_names', but has {names!r}. "
                        f"{_CIFAR10_FIX}")
    return tuple(_as_text(name) for name in names)


@dataclass(frozen=True)
class CIFAR10Arrays:
    """CIFAR-10 as arrays: images are N x 32 x 32 x 3 uint8 (height, width, RGB), labels N int64 in 0..9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def read_cifar10_format(root: str | os.PathLike) -> CIFAR10Arrays:
    """Read ``root/cifar-10-batches-py`` without running code from the pickles.

    Files whose MD5 sums differ from the official archive are read anyway, with one warning. Raises
    :class:`DataError` naming the file when one is missing, is not a readable pickle, refers to a
    global outside ``_CIFAR10Unpickler.ALLOWED_GLOBALS``, or has data that is not CIFAR-10 shaped.
    """
    folder = Path(root).expanduser() / CIFAR10_FOLDER
    unofficial: list[str] = []
    train = [_read_cifar10_batch(folder / name, unofficial) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar10_batch(folder / CIFAR10_TEST_FILE, unofficial)
    classes = _read_cifar10_classes(folder / CIFAR10_META_FILE, unofficial)
    if unofficial:
        log.warning("%d of the %d CIFAR-10 files in %s are not the official ones (their MD5 sums differ): %s. "
                    "Continuing with them.", len(unofficial), len(CIFAR10_MD5), folder, ", ".join(unofficial))
    return CIFAR10Arrays(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
    )


def _check_images_and_labels(images: Any, labels: Any, split: str, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{split} images must be an N x 32 x 32 x 3 uint8 array (height, width, RGB), "
                        f"but got a {images.dtype} array of shape {images.shape}.")
    if len(images) < min_count:
        raise DataError(f"{split} needs at least {min_count} images, but got {len(images)}.")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{split} labels must be {len(images)} integers, one per image, "
                        f"but got a {labels.dtype} array of shape {labels.shape}.")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{split} labels must be in 0..9, but range from {labels.min()} to {labels.max()}.")
    return images, labels


def _write_pickle(path: Path, content: dict[bytes, Any]) -> None:
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)


def write_cifar10_format(
    root: str | os.PathLike,
    train: tuple[np.ndarray, Sequence[int] | np.ndarray],
    test: tuple[np.ndarray, Sequence[int] | np.ndarray],
    classes: Sequence[str] = CIFAR10_CLASSES,
) -> Path:
    """Write images as CIFAR-10's python format in ``root/cifar-10-batches-py``, readable by ``data=cifar10``.

    The training images are cut, in order, into five near-equal batches. Every file is a dict with
    bytes keys, as in the official files: ``data``, ``labels``, ``filenames`` and ``batch_label`` in a
    batch, ``label_names`` in ``batches.meta``. Protocol 2 makes reading them back take the same path
    as the official files, including the MD5 warning. The folder is written under a temporary name and
    renamed when complete, so a failed call leaves no folder that a later run would read.

    Args:
        root: folder to write into, created if missing.
        train: training images, N x 32 x 32 x 3 uint8 (height, width, RGB) with N >= 5, and N labels in 0..9.
        test: test images and labels in the same layout, at least one.
        classes: the ten class names stored in ``batches.meta``.

    Returns:
        The folder ``root/cifar-10-batches-py``.

    Raises:
        DataError: on images or labels of the wrong shape, type or range, or if the folder exists already.
    """
    train_images, train_labels = _check_images_and_labels(*train, split="train", min_count=len(CIFAR10_TRAIN_FILES))
    test_images, test_labels = _check_images_and_labels(*test, split="test", min_count=1)
    if len(classes) != 10:
        raise DataError(f"classes must contain 10 names, but got {len(classes)}: {list(classes)}.")
    root = Path(root).expanduser()
    target = root / CIFAR10_FOLDER
    if target.exists():
        raise DataError(f"{target} already exists. Remove it or write into another root.")
    root.mkdir(parents=True, exist_ok=True)

    batches = list(zip(np.array_split(train_images, 5), np.array_split(train_labels, 5)))
    batches.append((test_images, test_labels))
    names = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    batch_labels = [f"training batch {i} of 5" for i in range(1, 6)] + ["testing batch 1 of 1"]
    # mkdir, unlike tempfile.mkdtemp, gives the folder the umask's permissions rather than owner-only.
    staging = root / f".{CIFAR10_FOLDER}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, batch_label, (images, labels) in zip(names, batch_labels, batches):
            _write_pickle(staging / name, {
                b"batch_label": batch_label.encode(),
                b"labels": [int(label) for label in labels],
                b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32),
                b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(images))],
            })
        _write_pickle(staging / CIFAR10_META_FILE, {
            b"num_cases_per_batch": len(batches[0][0]),
            b"label_names": [str(name) for name in classes],
            b"num_vis": 3 * 32 * 32,
        })
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class ImageArrayDataset(Dataset):
    """Dataset of images in an N x H x W x C uint8 array. Each item is ``(transform(PIL image), int label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Any]) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _cifar10_root(root: str | None) -> Path:
    """Return ``data.root``, the folder that contains ``cifar-10-batches-py``, or raise DataError with the fix."""
    if root is None or str(root) in ("", "???"):
        raise DataError(f"data.root is missing: data=cifar10 needs data.root=PATH, the folder that contains "
                        f"'{CIFAR10_FOLDER}' (where cifar-10-python.tar.gz was extracted). Nothing is downloaded.")
    path = _require_dir(root, "cifar10", f"the folder '{CIFAR10_FOLDER}' from the CIFAR-10 python archive")
    if (path / CIFAR10_FOLDER).is_dir():
        return path
    if path.name == CIFAR10_FOLDER or (path / CIFAR10_TRAIN_FILES[0]).is_file():
        rename = "" if path.name == CIFAR10_FOLDER else f"rename it to '{CIFAR10_FOLDER}' and "
        raise DataError(f"data.root={str(path)!r} is the CIFAR-10 batches folder itself, but data.root must be the "
                        f"folder that contains '{CIFAR10_FOLDER}'; {rename}point data.root at its parent folder "
                        f"{str(path.resolve().parent)!r}.")
    raise DataError(f"data.root={str(path)!r} has no '{CIFAR10_FOLDER}' folder; extract cifar-10-python.tar.gz there.")


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from a local copy in the python format (``cifar-10-batches-py``), never downloaded.

    The files are read by :func:`read_cifar10_format`, which runs no code from the pickles. The official
    test set is the test set, and validation takes the share ``split[1]`` of the training images.
    """

    in_channels = 3
    num_classes = 10
    resolution = 32

    def __init__(self, root: str | None = None, augment: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = _cifar10_root(root)
        self.augment = augment

    # Per-channel mean and standard deviation of CIFAR-10's training images in [0, 1].
    MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def preprocessing(self) -> dict[str, Any]:
        size = f"{self.resolution}x{self.resolution}"
        return {"channels": self.in_channels, "resolution": self.resolution,
                "pixels": f"RGB {size}, values 0 to 255 divided by 255", "mean": list(self.MEAN), "std": list(self.STD)}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms

        normalize = transforms.Normalize(self.MEAN, self.STD)
        plain = transforms.Compose([transforms.ToTensor(), normalize])
        augmented = transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
        )
        arrays = read_cifar10_format(self.root)
        train_pool = ImageArrayDataset(arrays.train_images, arrays.train_labels, augmented if self.augment else plain)
        eval_pool = ImageArrayDataset(arrays.train_images, arrays.train_labels, plain)

        # The official test set stays the test set; validation is carved out of the training images.
        n_val = int(round(len(train_pool) * self.split[1]))
        if not 0 < n_val < len(train_pool):
            raise DataError(f"data.split[1]={self.split[1]} puts {n_val} of {len(train_pool)} CIFAR-10 training "
                            f"images in the validation set. Choose a share that leaves at least one image on each side.")
        order = np.random.default_rng(self.seed).permutation(len(train_pool))
        train_idx = order[n_val:]
        if self.max_train_samples is not None:
            train_idx = train_idx[: self.max_train_samples]
        self.train_set = Subset(train_pool, train_idx.tolist())
        self.val_set = Subset(eval_pool, order[:n_val].tolist())
        self.test_set = ImageArrayDataset(arrays.test_images, arrays.test_labels, plain)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root), "augment": self.augment}

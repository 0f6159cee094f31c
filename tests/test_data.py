import numpy as np
import pytest
import torch

from nas.data import DataError, build_datamodule


def test_mnist_subset_split_is_seeded():
    first = build_datamodule({"name": "mnist", "seed": 3})
    first.setup()
    second = build_datamodule({"name": "mnist", "seed": 3})
    second.setup()
    assert (len(first.train_set), len(first.val_set), len(first.test_set)) == (4000, 500, 500)
    assert first.train_set.indices[:20] == second.train_set.indices[:20]
    x, y = next(iter(first.train_dataloader()))
    assert x.shape[1:] == (1, 28, 28)
    assert y.dtype == torch.int64


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    datamodule = build_datamodule({"name": "imagefolder", "root": str(tmp_path), "resolution": 16, "batch_size": 4,
                                   "seed": 0, "split": [0.6, 0.2, 0.2]})
    assert datamodule.num_classes == 2
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    assert set(y.tolist()) <= {0, 1}


def test_imagefolder_class_count_checked(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
    with pytest.raises(DataError, match="data.num_classes=5 but .* has 2 class folders"):
        build_datamodule({"name": "imagefolder", "root": str(tmp_path), "num_classes": 5})


def test_cifar10_needs_extracted_archive(tmp_path):
    with pytest.raises(DataError, match="has no 'cifar-10-batches-py' folder"):
        build_datamodule({"name": "cifar10", "root": str(tmp_path)})


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="available datasets are \\['cifar10', 'imagefolder', 'mnist', 'synthetic'\\]"):
        build_datamodule({"name": "svhn"})


def test_bad_split_rejected():
    datamodule = build_datamodule({"name": "synthetic", "split": [0.5, 0.5, 0.5]})
    with pytest.raises(DataError, match="three positive fractions that sum to 1"):
        datamodule.setup()

import io
import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from nas.data import CIFAR10_FOLDER, DataError, build_datamodule, read_cifar10_format, write_cifar10_format


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


def _write_images(folder, classes, count):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in classes:
        (folder / label).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")


def _labels(dataset):
    return sorted({int(y) for _, y in dataset})


@pytest.mark.parametrize("layout", ["pool", "train-val"])
def test_imagefolder_upscaling_warned(tmp_path, layout, caplog):
    if layout == "pool":
        _write_images(tmp_path, ["a", "b"], 6)
    else:
        _write_images(tmp_path / "train", ["a", "b"], 6)
        _write_images(tmp_path / "val", ["a", "b"], 2)
    for resolution, warned in ((32, True), (12, False), (8, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nas.data"):
            build_datamodule({"name": "imagefolder", "root": str(tmp_path), "resolution": resolution}).setup()
        assert ("median shorter side of 12 pixels (12 sampled), so data.resolution=32 upscales them 2.7 times"
                in caplog.text) is warned
        assert ("run search.py with data.resolution=12" in caplog.text) is warned


def test_imagefolder_train_alone_is_split(tmp_path):
    _write_images(tmp_path / "train", ["a", "b", "c"], 10)
    datamodule = build_datamodule({"name": "imagefolder", "root": str(tmp_path), "resolution": 8,
                                   "split": [0.6, 0.2, 0.2]})
    datamodule.setup()
    assert datamodule.num_classes == 3
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (18, 6, 6)
    assert _labels(datamodule.train_set) == [0, 1, 2]  # not one class named "train"


@pytest.mark.parametrize("with_test", [False, True])
def test_imagefolder_train_val_test(tmp_path, with_test):
    _write_images(tmp_path / "train", ["a", "b"], 6)
    _write_images(tmp_path / "val", ["a", "b"], 4)
    if with_test:
        _write_images(tmp_path / "test", ["a", "b"], 3)
    datamodule = build_datamodule({"name": "imagefolder", "root": str(tmp_path), "resolution": 8,
                                   "max_train_samples": 5})
    datamodule.setup()
    sizes = (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set))
    assert sizes == ((5, 8, 6) if with_test else (5, 4, 4))


@pytest.mark.parametrize(("train", "held_out", "message"), [
    (["a", "b", "c"], ["a", "c"], r"but it lacks \['b'\]\. Add"),
    (["a", "b"], ["a", "b", "z"], r"but it has \['z'\] besides\. Add"),
])
def test_imagefolder_val_classes_must_match(tmp_path, train, held_out, message):
    _write_images(tmp_path / "train", train, 1)
    _write_images(tmp_path / "val", held_out, 1)
    with pytest.raises(DataError, match=message):
        build_datamodule({"name": "imagefolder", "root": str(tmp_path)})


def test_imagefolder_test_without_val(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], 1)
    _write_images(tmp_path / "test", ["a", "b"], 1)
    with pytest.raises(DataError, match="no val/ folder"):
        build_datamodule({"name": "imagefolder", "root": str(tmp_path)})


def test_imagefolder_empty_class_folders(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "readme.txt").write_text("no images")
    datamodule = build_datamodule({"name": "imagefolder", "root": str(tmp_path)})
    with pytest.raises(DataError, match="Found no valid file for the classes a, b"):
        datamodule.setup()


def test_summary_warns_on_small_validation(caplog):
    datamodule = build_datamodule({"name": "synthetic", "num_samples": 100, "split": [0.8, 0.1, 0.1]})
    with caplog.at_level(logging.INFO, logger="nas.data.base"):
        datamodule.log_summary()
    assert "80 / 10 / 10 train / validation / test images" in caplog.text
    assert "contains only 10 images, so one image moves accuracy by 10.0%" in caplog.text


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


def _write_tiny_cifar10(root, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), np.arange(n_train) % 10)
    test = (rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), (np.arange(n_test) * 3) % 10)
    write_cifar10_format(root, train=train, test=test)
    return train, test


def _cifar10_module(root, seed=0, **options):
    return build_datamodule({"name": "cifar10", "root": str(root), "batch_size": 8, "num_workers": 0, "seed": seed,
                             "split": [0.9, 0.1, 0.0], **options})


def test_cifar10_roundtrip_keeps_pixels(tmp_path):
    (train_images, train_labels), (test_images, test_labels) = _write_tiny_cifar10(tmp_path)
    arrays = read_cifar10_format(tmp_path)
    assert arrays.train_images.shape == (60, 32, 32, 3)
    assert np.array_equal(arrays.train_images, train_images)
    assert np.array_equal(arrays.train_labels, train_labels)
    assert np.array_equal(arrays.test_images, test_images)
    assert np.array_equal(arrays.test_labels, test_labels)
    assert arrays.classes[0] == "airplane"


def test_cifar10_file_is_channel_major(tmp_path):
    images = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 1, 2] = 200  # blue value of the second pixel in the first row
    write_cifar10_format(tmp_path, train=(images, [0] * 5), test=(images[:1], [0]))
    with open(tmp_path / CIFAR10_FOLDER / "data_batch_1", "rb") as file:
        row = pickle.load(file)[b"data"][0]
    assert row.shape == (3072,)
    assert row[2 * 1024 + 1] == 200
    assert row.sum() == 200


def test_cifar10_module_shapes_and_labels(tmp_path):
    _, (_, test_labels) = _write_tiny_cifar10(tmp_path)
    datamodule = _cifar10_module(tmp_path)
    datamodule.setup()
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (54, 6, 20)
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    test_y = torch.cat([y for _, y in datamodule.test_dataloader()])
    assert test_y.tolist() == test_labels.tolist()


def test_cifar10_eval_images_not_augmented(tmp_path):
    _write_tiny_cifar10(tmp_path)
    datamodule = _cifar10_module(tmp_path)
    datamodule.setup()
    first, _ = datamodule.val_set[0]
    again, _ = datamodule.val_set[0]
    assert torch.equal(first, again)
    torch.manual_seed(0)
    crops = {datamodule.train_set[0][0].sum().item() for _ in range(8)}
    assert len(crops) > 1


def test_cifar10_split_is_seeded(tmp_path):
    _write_tiny_cifar10(tmp_path)
    first, second, other = _cifar10_module(tmp_path, seed=3), _cifar10_module(tmp_path, seed=3), _cifar10_module(tmp_path, seed=4)
    for datamodule in (first, second, other):
        datamodule.setup()
    assert first.val_set.indices == second.val_set.indices
    assert first.train_set.indices == second.train_set.indices
    assert first.val_set.indices != other.val_set.indices
    assert not set(first.val_set.indices) & set(first.train_set.indices)


def test_cifar10_max_train_samples(tmp_path):
    _write_tiny_cifar10(tmp_path)
    datamodule = _cifar10_module(tmp_path, max_train_samples=10)
    datamodule.setup()
    assert len(datamodule.train_set) == 10
    assert len(datamodule.val_set) == 6


def test_cifar10_empty_validation_rejected(tmp_path):
    _write_tiny_cifar10(tmp_path)
    datamodule = build_datamodule({"name": "cifar10", "root": str(tmp_path), "split": [0.999, 0.001, 0.0]})
    with pytest.raises(DataError, match=r"data.split\[1\]=0.001 puts 0 of 60 CIFAR-10 training images"):
        datamodule.setup()


class _Python2Pickler(pickle._Pickler):
    """Pickler that writes bytes as Python 2 ``str`` opcodes, as the official files store keys and pixels."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _dump_as_python2(content, path):
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(content)
    # numpy 1.x, which wrote the official files, kept _reconstruct in numpy.core.multiarray.
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def test_cifar10_reads_python2_pickles(tmp_path):
    (train_images, _), _ = _write_tiny_cifar10(tmp_path)
    folder = tmp_path / CIFAR10_FOLDER
    for name in ("data_batch_1", "batches.meta"):
        with open(folder / name, "rb") as file:
            content = pickle.load(file)
        _dump_as_python2(content, folder / name)
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "data_batch_1").read_bytes()
    arrays = read_cifar10_format(tmp_path)
    assert np.array_equal(arrays.train_images, train_images)
    assert arrays.classes[9] == "truck"


class _RunsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsMkdir:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("payload, refused", [(_RunsSystem, "system"), (_CallsMkdir, "mkdir")])
def test_cifar10_forbidden_global_not_run(tmp_path, payload, refused):
    _write_tiny_cifar10(tmp_path)
    marker = tmp_path / "side-effect"
    batch = tmp_path / CIFAR10_FOLDER / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": payload(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=rf"data_batch_3 refers to the global \w+\.{refused},") as error:
        read_cifar10_format(tmp_path)
    assert "the official archive" in str(error.value)
    assert not marker.exists()


def test_cifar10_checksum_mismatch_warns(tmp_path, caplog):
    _write_tiny_cifar10(tmp_path)
    with caplog.at_level(logging.WARNING, logger="nas.data"):
        read_cifar10_format(tmp_path)
    warned = [record.getMessage() for record in caplog.records if "not the official ones" in record.getMessage()]
    assert len(warned) == 1
    assert "7 of the 7 CIFAR-10 files" in warned[0]
    assert "data_batch_1, data_batch_2" in warned[0]
    assert warned[0].endswith("Continuing with them.")


def test_cifar10_missing_batch_named(tmp_path):
    _write_tiny_cifar10(tmp_path)
    (tmp_path / CIFAR10_FOLDER / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4 is missing. Extract cifar-10-python.tar.gz into data.root"):
        _cifar10_module(tmp_path).setup()


def test_cifar10_truncated_pickle_rejected(tmp_path):
    _write_tiny_cifar10(tmp_path)
    batch = tmp_path / CIFAR10_FOLDER / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"test_batch is not a readable pickle .*Extract cifar-10-python.tar.gz"):
        read_cifar10_format(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"'data' as a uint8 array of shape \(2, 3000\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"'data' as a float32 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels from 0 to 10, outside 0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"but 2 integers were expected"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, r"has no 'labels' key \(its keys are \['data'\]\)"),
        ([1, 2], r"contains a list, but a dict was expected"),
    ],
)
def test_cifar10_bad_batch_rejected(tmp_path, content, message):
    _write_tiny_cifar10(tmp_path)
    batch = tmp_path / CIFAR10_FOLDER / "data_batch_2"
    batch.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2 .*" + message):
        read_cifar10_format(tmp_path)


def test_cifar10_writer_checks_input(tmp_path):
    images = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=r"train images must be an N x 32 x 32 x 3 uint8 array"):
        write_cifar10_format(tmp_path, train=(images.transpose(0, 3, 1, 2), [0] * 5), test=(images, [0] * 5))
    with pytest.raises(DataError, match=r"test labels must be in 0..9, but range from 0 to 12"):
        write_cifar10_format(tmp_path, train=(images, [0] * 5), test=(images, [0, 1, 2, 3, 12]))
    assert not (tmp_path / CIFAR10_FOLDER).exists()
    write_cifar10_format(tmp_path, train=(images, [0] * 5), test=(images, [0] * 5))
    with pytest.raises(DataError, match=r"already exists. Remove it or write into another root"):
        write_cifar10_format(tmp_path, train=(images, [0] * 5), test=(images, [0] * 5))
    assert sorted(path.name for path in tmp_path.iterdir()) == [CIFAR10_FOLDER]


def test_cifar10_writer_folder_permissions(tmp_path):
    images = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    folder = write_cifar10_format(tmp_path / "out", train=(images, [0] * 5), test=(images, [0] * 5))
    reference = tmp_path / "reference"
    reference.mkdir()
    assert folder.stat().st_mode == reference.stat().st_mode


@pytest.mark.parametrize("root", [None, "???"])
def test_cifar10_missing_root_message(root):
    with pytest.raises(DataError) as excinfo:
        build_datamodule({"name": "cifar10", "root": root})
    assert str(excinfo.value) == (
        "data.root is missing: data=cifar10 needs data.root=PATH, the folder that contains 'cifar-10-batches-py' "
        "(where cifar-10-python.tar.gz was extracted). Nothing is downloaded.")


def test_cifar10_root_at_batches_folder(tmp_path):
    _write_tiny_cifar10(tmp_path)
    folder = tmp_path / CIFAR10_FOLDER
    with pytest.raises(DataError) as excinfo:
        build_datamodule({"name": "cifar10", "root": str(folder)})
    assert str(excinfo.value) == (
        f"data.root={str(folder)!r} is the CIFAR-10 batches folder itself, but data.root must be the folder that "
        f"contains 'cifar-10-batches-py'; point data.root at its parent folder {str(tmp_path.resolve())!r}.")
    assert _cifar10_module(tmp_path).root == tmp_path


def test_cifar10_renamed_batches_folder(tmp_path):
    _write_tiny_cifar10(tmp_path)
    renamed = tmp_path / "cifar10-batches"
    (tmp_path / CIFAR10_FOLDER).rename(renamed)
    with pytest.raises(DataError) as excinfo:
        build_datamodule({"name": "cifar10", "root": str(renamed)})
    assert str(excinfo.value).endswith(
        f"rename it to 'cifar-10-batches-py' and point data.root at its parent folder {str(tmp_path.resolve())!r}.")


def test_imagefolder_layout_logged_and_stray_folders_warned(tmp_path, caplog):
    _write_images(tmp_path / "train", ["a", "b"], 4)
    _write_images(tmp_path / "val", ["a", "b"], 2)
    (tmp_path / "stray").mkdir()
    with caplog.at_level(logging.INFO, logger="nas.data"):
        datamodule = build_datamodule({"name": "imagefolder", "root": str(tmp_path), "resolution": 8})
        datamodule.log_summary()
    assert "the folders ['stray'], which are not read" in caplog.text
    assert "train/, and val/ halved into validation and test" in caplog.text


def test_preprocessing_normalisation(tmp_path):
    mnist = build_datamodule({"name": "mnist"}).preprocessing()
    assert (mnist["channels"], mnist["resolution"], mnist["mean"], mnist["std"]) == (1, 28, [0.1307], [0.3081])
    _write_tiny_cifar10(tmp_path)
    cifar = _cifar10_module(tmp_path).preprocessing()
    assert (cifar["channels"], cifar["resolution"], len(cifar["mean"]), len(cifar["std"])) == (3, 32, 3, 3)


def test_fixed_dataset_rejects_other_shape():
    with pytest.raises(DataError, match=r"data.num_classes=2, but mnist has 10; leave data.num_classes as it is"):
        build_datamodule({"name": "mnist", "num_classes": 2})
    assert build_datamodule({"name": "mnist", "num_classes": 10, "in_channels": 1, "resolution": 28}).num_classes == 10


def test_loaders_resize_to_subnet_resolution():
    import torch.nn.functional as F

    datamodule = build_datamodule({"name": "synthetic", "num_samples": 40, "resolution": 28, "batch_size": 8,
                                   "eval_batch_size": 8})
    datamodule.setup()
    plain = next(iter(datamodule.val_dataloader()))[0]
    datamodule.resize_inputs(20, 20)
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert next(iter(loader))[0].shape[-2:] == (20, 20)
    # The same images, resized as the search resizes a batch for a subnet.
    resized = next(iter(datamodule.val_dataloader()))[0]
    torch.testing.assert_close(resized, F.interpolate(plain, size=(20, 20), mode="bilinear", align_corners=False))
    described = datamodule.input_description()
    assert described["resolution"] == 20
    assert "from 28x28 to 20x20" in described["resize"]
    # The data's own resolution resizes nothing.
    datamodule.resize_inputs(28, 28)
    assert datamodule.input_size is None
    assert "resize" not in datamodule.input_description()
    assert next(iter(datamodule.val_dataloader()))[0].shape[-2:] == (28, 28)


def test_resizing_collate_pickles():
    from nas.data.base import ResizingCollate

    collate = pickle.loads(pickle.dumps(ResizingCollate((4, 4))))
    x, y = collate([(torch.ones(1, 8, 8), 0), (torch.zeros(1, 8, 8), 1)])
    assert x.shape == (2, 1, 4, 4)
    assert y.tolist() == [0, 1]


def test_train_resizes_data_to_picked_subnet(resnet_config):
    import train
    from nas.spaces import create_space

    space = create_space({**resnet_config, "resolutions": [20, 28]})
    data = {"name": "synthetic", "num_samples": 40, "resolution": 28, "batch_size": 8, "eval_batch_size": 8}
    small = space.arch_from_dict({**space.largest().to_dict(), "resolution": 20})
    datamodule = train.load_data(data, space, small)
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert next(iter(loader))[0].shape[-2:] == (20, 20)
    assert datamodule.input_description()["resolution"] == 20
    assert train.load_data(data, space, space.largest()).input_size is None


def test_imagefolder_size_check_skips_unreadable_file(tmp_path, caplog):
    _write_images(tmp_path, ["a", "b"], 3)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="nas.data"):
        build_datamodule({"name": "imagefolder", "root": str(tmp_path), "resolution": 32}).setup()
    assert "median shorter side of 12 pixels (6 sampled)" in caplog.text


def test_imagefolder_size_sample_spans_classes(tmp_path, caplog):
    from PIL import Image

    # ImageFolder lists class "a" first: its 33 large images fill a sample of the first 32 files.
    for label, count, side in (("a", 33, 64), ("b", 60, 8)):
        (tmp_path / label).mkdir()
        for i in range(count):
            Image.new("RGB", (side, side)).save(tmp_path / label / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="nas.data"):
        build_datamodule({"name": "imagefolder", "root": str(tmp_path), "resolution": 32}).setup()
    assert "median shorter side of 8 pixels (32 sampled)" in caplog.text

"""Subnet export: safetensors weights, timm models, torch.export programs and ONNX."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nas.export import (
    EXPORT_FORMAT_VERSION,
    ExportError,
    export_onnx,
    export_program,
    export_torch,
    load_program,
    load_torch,
    to_timm,
)
from nas.spaces import create_space
from nas.supernet import recalibrate_batchnorm

CONF = Path(__file__).resolve().parents[1] / "conf" / "space"

TINY_RESNET = {
    "name": "tiny_resnet",
    "family": "resnet",
    "block": "basic",
    "in_channels": 1,
    "num_classes": 10,
    "resolutions": [16],
    "stem": {"channels": 8, "kernel_size": 3, "stride": 1, "max_pool": False},
    "stages": [{"depths": [1, 2], "widths": [8, 16], "stride": 1}, {"depths": [1], "widths": [16, 24], "stride": 2}],
    "expand_ratios": None,
    "tail_aware": False,
}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())


def calibrated_subnet(space, arch, seed: int = 0) -> torch.nn.Module:
    """Extract ``arch`` and give it BatchNorm statistics from random batches, so outputs are of order one."""
    model = space.build_supernet().extract(arch)
    generator = torch.Generator().manual_seed(seed)
    shape = space.input_shape(arch)
    recalibrate_batchnorm(model, [torch.randn(4, *shape, generator=generator)], max_batches=1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    space = create_space(TINY_RESNET)
    arch = space.largest()
    return space, arch, calibrated_subnet(space, arch)


@pytest.fixture(scope="module")
def tiny_mobilenet():
    config = {**load_yaml("mobilenet"), "in_channels": 1, "num_classes": 10, "dropout_rate": 0.0,
              "base_widths": [8, 8, 8, 16, 16, 24, 32, 64, 64]}
    space = create_space(config)
    arch = space.sample(np.random.default_rng(0))
    return space, arch, calibrated_subnet(space, arch)


# -- safetensors ------------------------------------------------------------------------------
def test_torch_export_rebuilds_module(tiny, tmp_path):
    space, arch, model = tiny
    path = export_torch(model, tmp_path / "subnet.safetensors", space, arch)
    loaded = load_torch(path)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.safetensors"]


def test_torch_export_records_version(tiny, tmp_path):
    from safetensors import safe_open

    space, arch, model = tiny
    path = export_torch(model, tmp_path / "subnet.safetensors", space, arch)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["tailnas_format_version"] == str(EXPORT_FORMAT_VERSION)
    assert json.loads(metadata["arch"]) == arch.to_dict()


def test_torch_export_without_arch_needs_model(tiny, tmp_path):
    space, arch, model = tiny
    path = export_torch(model, tmp_path / "weights.safetensors")
    with pytest.raises(ExportError) as err:
        load_torch(path)
    assert "pass the module to load into" in str(err.value)
    target = space.build_supernet().build_static(arch)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_torch(path, target)(x), model(x))


def test_torch_export_wrong_version_rejected(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"tailnas_format_version": "0"})
    with pytest.raises(ExportError) as err:
        load_torch(path, tiny[2])
    assert "version '0'" in str(err.value)


def test_torch_export_mobilenet_round_trip(tiny_mobilenet, tmp_path):
    space, arch, model = tiny_mobilenet
    loaded = load_torch(export_torch(model, tmp_path / "m.safetensors", space, arch))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# -- torch.export ---------------------------------------------------------------------------------
def test_program_runs_any_batch(tiny, tmp_path):
    _, _, model = tiny
    path = tmp_path / "subnet.pt2"
    export_program(model, torch.randn(1, 1, 16, 16), path)
    program = load_program(path)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_program_mobilenet(tiny_mobilenet, tmp_path):
    _, _, model = tiny_mobilenet
    program = export_program(model, torch.randn(2, 1, 28, 28), tmp_path / "m.pt2", dynamic_batch=False)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


# -- ONNX ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_matches_pytorch(tiny, tmp_path, dynamo):
    import onnx
    import onnxruntime as ort

    _, _, model = tiny
    path = tmp_path / "subnet.onnx"
    with warnings.catch_warnings():
        # A static subnet's shortcut does not depend on the input's shape, so the trace is exact.
        warnings.simplefilter("error", torch.jit.TracerWarning)
        difference = export_onnx(model, torch.randn(2, 1, 16, 16), path, dynamo=dynamo)
    assert difference < 1e-4

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["tailnas_format_version"] == str(EXPORT_FORMAT_VERSION)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 16, 16)
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.allclose(output, model(x).numpy(), atol=1e-4)


def test_onnx_mobilenet(tiny_mobilenet, tmp_path):
    _, _, model = tiny_mobilenet
    difference = export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", dynamo=False)
    assert difference < 1e-4


def test_onnx_mismatch_raises(tiny, tmp_path, monkeypatch):
    import nas.export as export

    _, _, model = tiny
    monkeypatch.setattr(export, "_onnx_difference", lambda *args: (0.5, 1.0))
    with pytest.raises(ExportError) as err:
        export_onnx(model, torch.randn(2, 1, 16, 16), tmp_path / "bad.onnx", dynamo=False)
    assert "differs from PyTorch by 0.5" in str(err.value)
    assert (tmp_path / "bad.onnx").exists()


# -- timm ---------------------------------------------------------------------------------------
def test_timm_resnet18_from_basic_space():
    space = create_space(load_yaml("resnet_basic_imagenet"))
    arch = space.arch_from_dict({"depths": [2, 2, 2, 2], "widths": [64, 128, 256, 512], "expand_ratios": [],
                                 "resolution": 160})
    model = space.build_supernet().extract(arch)
    timm_model = to_timm(space, arch, model)
    assert type(timm_model).__name__ == "ResNet"
    assert sum(p.numel() for p in timm_model.parameters()) == space.params(arch) == 11_689_512  # timm's resnet18
    assert [len(getattr(timm_model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]


def test_timm_resnet_outputs_match():
    config = {**load_yaml("resnet_basic_imagenet"), "resolutions": [64]}
    space = create_space(config)
    arch = space.smallest()
    model = calibrated_subnet(space, arch)
    timm_model = to_timm(space, arch, model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(timm_model(x), model(x), atol=1e-5)


def test_timm_bottleneck_quarter_width_fits():
    space = create_space(load_yaml("resnet_bottleneck_imagenet"))
    arch = space.arch_from_dict({"depths": [2, 2, 4, 2], "widths": [128, 256, 512, 1024],
                                 "expand_ratios": [0.25] * 4, "resolution": 160})
    timm_model = to_timm(space, arch, space.build_supernet().build_static(arch))
    assert sum(p.numel() for p in timm_model.parameters()) == space.params(arch)


def test_timm_bottleneck_other_ratio_rejected():
    space = create_space(load_yaml("resnet_bottleneck_imagenet"))
    arch = space.arch_from_dict({"depths": [2, 2, 4, 2], "widths": [128, 256, 512, 1024],
                                 "expand_ratios": [0.25, 0.35, 0.25, 0.25], "resolution": 160})
    with pytest.raises(ExportError) as err:
        to_timm(space, arch, torch.nn.Module())
    assert "stage 1" in str(err.value)
    assert "expand ratio 0.35" in str(err.value)


def test_timm_small_stem_rejected(tiny):
    space, arch, model = tiny
    with pytest.raises(ExportError) as err:
        to_timm(space, arch, model)
    assert "7x7 stride-2 stem" in str(err.value)
    assert "kernel_size=3" in str(err.value)


def test_timm_unknown_family_rejected():
    from example_space import EXAMPLE_CONFIG

    space = create_space(EXAMPLE_CONFIG)
    with pytest.raises(ExportError) as err:
        to_timm(space, space.smallest(), torch.nn.Module())
    assert "'separable' has no timm counterpart" in str(err.value)


# -- load_program on files that are not programs --------------------------------------------------
def test_load_program_rejects_checkpoint(tmp_path, capfd):
    path = tmp_path / "subnet.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ExportError) as excinfo:
        load_program(path)
    assert str(excinfo.value) == (
        f"{str(path)!r} is a checkpoint (.pt, torch.save), not a torch.export program; use "
        "nas.export.load_finetuned(path) for the subnet.pt that train.py writes, or pass the .pt2 file next to it "
        "to load_program.")
    assert "Traceback" not in capfd.readouterr().err


def test_load_program_rejects_renamed_checkpoint(tmp_path, capfd):
    path = tmp_path / "subnet.pt2"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ExportError, match=r"is a checkpoint \(\.pt, torch\.save\), not a torch\.export program"):
        load_program(path)
    assert "Traceback" not in capfd.readouterr().err


def test_load_program_missing_path(tmp_path, capfd):
    path = tmp_path / "nowhere.pt2"
    with pytest.raises(ExportError) as excinfo:
        load_program(path)
    assert str(excinfo.value) == (f"{str(path)!r} not found; pass the .pt2 file that export_program wrote "
                                  "(train.py writes subnet.pt2 next to subnet.pt).")
    assert capfd.readouterr().err == ""


def test_load_program_rejects_directory_and_text(tmp_path):
    with pytest.raises(ExportError, match="is a directory; pass the .pt2 file in it"):
        load_program(tmp_path)
    path = tmp_path / "text.pt2"
    path.write_text("not a program")
    with pytest.raises(ExportError) as excinfo:
        load_program(path)
    assert str(excinfo.value) == (f"{str(path)!r} is not a torch.export program (not a zip archive); pass the .pt2 "
                                  "file that export_program wrote.")


def test_load_finetuned_random_bytes(tmp_path):
    from nas.export import ExportError, load_finetuned

    path = tmp_path / "junk.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ExportError, match="is not a train.py checkpoint or is damaged"):
        load_finetuned(path)

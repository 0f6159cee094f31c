"""Profiling: protocol validation, timing, profiler records, layer modules, fingerprints and profile_space."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import predictors.measurement as measurement
import predictors.profiler_records as profiler_records
import predictors.profiling as profiling
from nas.spaces import create_space
from nas.spaces.layers import LayerSpec
from predictors.fingerprint import device_fingerprint, fingerprint_id, fingerprints_match, simd_width_floats
from predictors.modules import build_layer_module, fold_batchnorm, layer_input_shape
from predictors.profiler_records import kernel_records_from_trace
from predictors.profiling import (
    DeviceUnavailableError,
    HardwareConfigError,
    MeasurementProtocol,
    ProfilingError,
    enumerate_layers,
    measure_arch,
    measure_module,
    profile_space,
    sample_subnets,
    width_sweep,
)
from predictors.store import ProfileStore
from tests.conftest import interrupt_after

ROOT = Path(__file__).resolve().parent.parent
FAST = MeasurementProtocol(warmup=1, repeats=3, threads=1)

TINY_SPACE = {
    "name": "tiny",
    "family": "resnet",
    "block": "basic",
    "in_channels": 1,
    "num_classes": 4,
    "resolutions": [8],
    "stem": {"channels": 8, "kernel_size": 3, "stride": 1, "max_pool": False},
    "stages": [
        {"depths": [1], "widths": [8, 16], "stride": 1},
        {"depths": [1, 2], "widths": [8, 16], "stride": 2},
    ],
    "expand_ratios": None,
    "tail_aware": False,
}


# -- protocol -------------------------------------------------------------------------------


def test_protocol_from_cpu_yaml():
    cfg = yaml.safe_load((ROOT / "conf" / "hardware" / "cpu.yaml").read_text())
    protocol = MeasurementProtocol.from_config(cfg)
    # The shipped CPU config differs from the dataclass defaults only in timing on one thread.
    assert protocol == MeasurementProtocol(threads=1)
    assert protocol.to_dict() == cfg


def test_cuda_yaml_is_a_valid_protocol():
    cfg = yaml.safe_load((ROOT / "conf" / "hardware" / "cuda.yaml").read_text())
    assert MeasurementProtocol(**cfg).device == "cuda"


def test_protocol_rejects_unknown_key():
    with pytest.raises(HardwareConfigError, match=r"Unknown keys \['bogus'\].*allowed keys are"):
        MeasurementProtocol.from_config({"device": "cpu", "bogus": 1})


@pytest.mark.parametrize(
    "key, value",
    [
        ("device", "tpu"),
        ("device", "cuda:x"),
        ("runtime", "tvm"),
        ("dtype", "int8"),
        ("batch_size", 0),
        ("batch_size", True),
        ("threads", 0),
        ("warmup", -1),
        ("repeats", 0),
        ("repeats", 2.5),
    ],
)
def test_protocol_rejects_bad_value(key, value):
    with pytest.raises(HardwareConfigError, match=f"hardware.{key}"):
        MeasurementProtocol.from_config({key: value})


def test_cuda_without_gpu_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError) as info:
        MeasurementProtocol.from_config({"device": "cuda"})
    message = str(info.value)
    assert "hardware.device='cuda' needs CUDA, but torch.cuda.is_available() is False" in message
    assert "Use hardware=cpu" in message


# -- measure_module -------------------------------------------------------------------------


def test_measure_module_cpu_numbers_and_operators():
    threads_before = torch.get_num_threads()
    module = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
    m = measure_module(module, (4, 8, 8), FAST)

    assert m.median_ms > 0
    assert m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.iqr_ms >= 0
    assert m.repeats == 3
    assert m.protocol["threads"] == 1
    assert torch.get_num_threads() == threads_before
    assert re.fullmatch(r"[0-9a-f]{12}", m.fingerprint_id)
    assert datetime.fromisoformat(m.date).tzinfo is not None
    assert m.load_avg_1m is None or m.load_avg_1m >= 0

    conv = [op for op in m.operators if op["name"] == "aten::conv2d"]
    assert conv, [op["name"] for op in m.operators]
    assert conv[0]["kind"] == "cpu_op"
    assert conv[0]["count"] == 1
    assert conv[0]["input_shapes"][0] == [1, 4, 8, 8]
    assert conv[0]["cpu_total_us"] >= conv[0]["self_cpu_us"] >= 0
    json.dumps(m.to_dict(), allow_nan=False)


def test_measure_module_batch_and_no_operators():
    m = measure_module(nn.Linear(6, 3), (6,), MeasurementProtocol(batch_size=4, warmup=0, repeats=2, threads=1),
                       record_operators=False)
    assert m.operators == []
    assert m.protocol["batch_size"] == 4


class InputRecorder(nn.Module):
    """Records every input it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x


def test_measure_module_times_given_inputs():
    recorder = InputRecorder()
    inputs = torch.arange(12.0).view(2, 6)
    measure_module(recorder, (6,), MeasurementProtocol(batch_size=2, warmup=1, repeats=2, threads=1),
                   record_operators=False, inputs=inputs)

    assert len(recorder.seen) == 3
    for seen in recorder.seen:
        assert torch.equal(seen, inputs)


def test_measure_module_rejects_misshaped_inputs():
    with pytest.raises(ValueError, match=r"must have shape \(2, 6\).*but got \(3, 6\)"):
        measure_module(nn.Identity(), (6,), MeasurementProtocol(batch_size=2, warmup=0, repeats=1, threads=1),
                       record_operators=False, inputs=torch.zeros(3, 6))


def test_empty_profiler_records_raise(monkeypatch):
    class EmptyProfile:
        def key_averages(self, group_by_input_shape: bool = False) -> list:
            return []

    monkeypatch.setattr(profiler_records, "_run_profiler", lambda module, x, device: EmptyProfile())
    with pytest.raises(ProfilingError, match="recorded no operator events"):
        measure_module(nn.ReLU(), (4,), FAST)


def test_kernel_records_from_trace():
    trace = {
        "traceEvents": [
            {"cat": "cpu_op", "name": "aten::conv2d", "dur": 30},
            {
                "cat": "kernel",
                "name": "implicit_gemm",
                "dur": 12.5,
                "args": {
                    "grid": [4, 1, 1],
                    "block": [128, 1, 1],
                    "registers per thread": 64,
                    "shared memory": 16384,
                    "blocks per SM": 0.03,
                    "est. achieved occupancy %": 6,
                },
            },
        ]
    }

    records = kernel_records_from_trace(trace, sm_count=132)

    assert len(records) == 1
    kernel = records[0]
    assert kernel["kind"] == "kernel"
    assert kernel["name"] == "implicit_gemm"
    assert kernel["duration_us"] == 12.5
    assert kernel["grid"] == [4, 1, 1]
    assert kernel["block"] == [128, 1, 1]
    assert kernel["registers_per_thread"] == 64
    assert kernel["shared_memory_bytes"] == 16384
    assert kernel["blocks_per_sm"] == 0.03
    assert kernel["est_occupancy_pct"] == 6
    assert kernel["warps_per_sm"] is None
    assert kernel["sm_count"] == 132


def test_kernel_records_capitalised_category():
    trace = {"traceEvents": [{"cat": "Kernel", "name": "gemm", "dur": 3, "args": {}}]}

    records = kernel_records_from_trace(trace, sm_count=None)

    assert len(records) == 1
    assert records[0]["est_occupancy_pct"] is None
    assert records[0]["grid"] is None


@pytest.mark.gpu
def test_cuda_kernel_records():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    protocol = MeasurementProtocol(device="cuda", warmup=2, repeats=5)
    m = measure_module(nn.Conv2d(16, 32, 3, padding=1), (16, 32, 32), protocol)
    kernels = [op for op in m.operators if op["kind"] == "kernel"]
    assert kernels
    assert all(k["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count for k in kernels)
    assert any(k["grid"] is not None and k["block"] is not None for k in kernels)
    assert m.median_ms > 0


# -- layer modules --------------------------------------------------------------------------

LAYERS = [
    (LayerSpec("conv", 4, 8, 9, 3, 2, act="relu"), (8, 5, 5)),
    (LayerSpec("conv", 8, 8, 6, 3, 1, groups=8, act="hswish"), (8, 6, 6)),
    (LayerSpec("conv", 4, 6, 6, 1, 1), (6, 6, 6)),
    (LayerSpec("add", 8, 8, 6, act="relu"), (8, 6, 6)),
    (LayerSpec("se", 8, 2, 6), (8, 6, 6)),
    (LayerSpec("maxpool", 8, 8, 7, 3, 2), (8, 4, 4)),
    (LayerSpec("gap", 8, 8, 6), (8,)),
    (LayerSpec("linear", 8, 3, 1), (3,)),
]


@pytest.mark.parametrize("spec, expected", LAYERS, ids=[spec.op for spec, _ in LAYERS])
def test_layer_module_output_shape(spec, expected):
    module = build_layer_module(spec).eval()
    x = torch.randn(2, *layer_input_shape(spec))
    with torch.inference_mode():
        y = module(x)
    assert tuple(y.shape) == (2, *expected)
    assert y[0].numel() == spec.output_elements
    assert x[0].numel() == spec.input_elements


def test_layer_conv_has_folded_bias_and_no_batchnorm():
    module = build_layer_module(LayerSpec("conv", 4, 8, 6, 3, act="relu"))
    assert module[0].bias is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def _small_mobilenet():
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "space" / "mobilenet.yaml").read_text())
    config.update(in_channels=1, num_classes=4, resolutions=[16], depths=[2],
                  base_widths=[8, 8, 8, 8, 16, 16, 16, 32, 32], kernel_sizes=[3], expand_ratios=[3])
    return create_space(config)


@pytest.mark.parametrize("make_space", [lambda: create_space(TINY_SPACE), _small_mobilenet], ids=["resnet", "mobilenet"])
def test_fold_batchnorm_keeps_outputs(make_space):
    space = make_space()
    model = space.build_supernet().extract(space.largest())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.eval()
    x = torch.randn(2, *space.input_shape(space.largest()))
    with torch.inference_mode():
        expected = model(x)
    assert batchnorms > 0
    assert fold_batchnorm(model) == batchnorms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=1e-4)


def test_fold_skips_batchnorm_subclasses():
    class NormAct(nn.BatchNorm2d):  # a BatchNorm that also applies an activation, as timm's BatchNormAct2d
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(1, 2, 3), NormAct(2)).eval()
    assert fold_batchnorm(model) == 0
    assert isinstance(model[1], NormAct)


def test_unfolded_batchnorm_warned_once(caplog, monkeypatch):
    monkeypatch.setattr(profiling, "_WARNED_UNFOLDED", set())

    class NormFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(1)
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(self.norm(x))

    with caplog.at_level("WARNING", logger="predictors.profiling"):
        for _ in range(2):
            assert profiling.fold_batchnorm_checked(NormFirst().eval(), (1, 8, 8)) is not None
    assert caplog.text.count("Folded 0 BatchNorm layers of NormFirst into convolutions, but 1 are left") == 1


def test_fold_batchnorm_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train())


def test_measure_arch_runs_folded_subnet():
    space = create_space(TINY_SPACE)
    m = measure_arch(space, space.smallest(), FAST)
    names = {op["name"] for op in m.operators}
    assert "aten::conv2d" in names
    assert "aten::batch_norm" not in names
    assert m.median_ms > 0


def test_measure_arch_leaves_supernet_in_place(monkeypatch):
    space = create_space(TINY_SPACE)
    supernet = space.build_supernet().train()
    moved = []
    for name in ("cpu", "cuda", "to"):
        original = getattr(nn.Module, name)

        def spy(module, *args, _original=original, _name=name, **kwargs):
            if module is supernet:
                moved.append(_name)
            return _original(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, name, spy)
    before = {key: value.clone() for key, value in supernet.state_dict().items()}
    measure_arch(space, space.smallest(), FAST, supernet=supernet)
    # The search scores accuracy with this supernet between measurements, on its own device and mode.
    assert moved == []
    assert supernet.training
    for key, value in supernet.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- fingerprints ---------------------------------------------------------------------------


def test_device_fingerprint_cpu_fields():
    fp = device_fingerprint(FAST)
    for name in ("cpu_model", "simd_flags", "l1d_cache_bytes", "logical_cores", "torch_version", "created"):
        assert name in fp
    assert fp["threads"] == 1
    assert fp["device_type"] == "cpu"
    assert fp["gpu_name"] is None
    assert fp["runtime"] == "eager"
    json.dumps(fp)


def test_fingerprint_id_ignores_threads_and_date():
    fp = device_fingerprint(FAST)
    later = {**fp, "threads": 7, "created": "2030-01-01T00:00:00+00:00", "name": "renamed"}
    assert fingerprint_id(fp) == fingerprint_id(later)
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint_id(fp))
    other = {**fp, "l2_cache_bytes": 1, "dtype": "bfloat16"}
    assert fingerprint_id(other) != fingerprint_id(fp)
    assert fingerprints_match(fp, later) == (True, [])
    assert fingerprints_match(fp, other) == (False, ["l2_cache_bytes", "dtype"])


@pytest.mark.parametrize(
    "flags, lanes",
    [(["avx512f", "avx2"], 16), (["avx2", "fma"], 8), (["avx"], 8), (["asimd"], 4), (["sse4_2"], 4), ([], 1)],
)
def test_simd_width_floats(flags, lanes):
    assert simd_width_floats({"simd_flags": flags}) == lanes


# -- profile_space --------------------------------------------------------------------------


def test_enumerate_layers_and_width_sweep(resnet_space):
    layers = enumerate_layers(resnet_space, seed=0)
    assert len(layers) == len(set(layers))
    for arch in (resnet_space.largest(), resnet_space.smallest()):
        assert set(resnet_space.layers(arch)) <= set(layers)

    sweep = width_sweep(layers, width_step=8)
    assert not set(sweep) & set(layers)
    stem_shape = [s for s in layers + sweep if s.op == "conv" and s.in_channels == 1 and s.in_size == 28]
    assert sorted(s.out_channels for s in stem_shape) == [8, 16]


def test_enumerate_layers_huge_space():
    space = create_space(yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "space" /
                                         "mobilenet_imagenet.yaml").read_text()))
    # 25 * 3**45 architectures: in int64 that product wraps to a negative number, which once sent this
    # space to the exhaustive enumeration, one that never ends.
    layers = enumerate_layers(space, seed=0, max_archs=4)
    assert set(space.layers(space.largest())) <= set(layers)


def test_width_sweep_fills_steps():
    layers = [LayerSpec("conv", 16, 24, 14, 3, 1, act="relu"), LayerSpec("conv", 16, 40, 14, 3, 1, act="relu")]
    sweep = width_sweep(layers, width_step=8)
    assert sorted(s.out_channels for s in sweep) == [8, 16, 32]
    assert all(s.in_channels == 16 and s.in_size == 14 and s.act == "relu" for s in sweep)
    with pytest.raises(ValueError, match="width_step"):
        width_sweep(layers, width_step=0)


def test_sample_subnets_prefix_stable(resnet_space):
    first = sample_subnets(resnet_space, 6, seed=3)
    more = sample_subnets(resnet_space, 10, seed=3)
    assert first[0] == resnet_space.largest()
    assert first[1] == resnet_space.smallest()
    assert more[:6] == first
    assert len({a.to_json() for a in more}) == 10


def test_profile_space_resumes_after_interrupt(tmp_path, monkeypatch):
    space = create_space(TINY_SPACE)
    store = ProfileStore(tmp_path, device_fingerprint(FAST))
    real_measure = profiling.measure_module
    calls = {"n": 0}
    monkeypatch.setattr(profiling, "measure_module", interrupt_after(real_measure, 7))
    with pytest.raises(KeyboardInterrupt):
        profile_space(space, store, FAST, n_subnets=3, seed=0, passes=2, progress=False)
    assert len(store.layer_records()) + len(store.subnet_records()) == 7

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_measure(*args, **kwargs)

    calls["n"] = 0
    monkeypatch.setattr(profiling, "measure_module", counting)
    summary = profile_space(space, store, FAST, n_subnets=3, seed=0, passes=2, progress=False)
    total_runs = 2 * (summary.distinct_layers + summary.distinct_subnets)
    assert summary.distinct_subnets == 3
    assert calls["n"] == total_runs - 7
    assert summary.layers_measured + summary.subnets_measured == total_runs - 7
    assert summary.layers_reused + summary.subnets_reused == 7

    layer_runs = [(r["key"], r["pass"]) for r in store.layer_records()]
    subnet_runs = [(r["key"], r["pass"]) for r in store.subnet_records()]
    assert len(layer_runs) == len(set(layer_runs)) == 2 * summary.distinct_layers
    assert len(subnet_runs) == len(set(subnet_runs)) == 2 * summary.distinct_subnets
    assert summary.noise_floor["n"] == 3

    calls["n"] = 0
    again = profile_space(space, store, FAST, n_subnets=3, seed=0, passes=2, progress=False)
    assert calls["n"] == 0
    assert again.layers_reused == 2 * summary.distinct_layers


def test_profile_space_interleaves_passes(tmp_path):
    space = create_space({**TINY_SPACE, "stages": TINY_SPACE["stages"][:1]})
    store = ProfileStore(tmp_path, device_fingerprint(FAST))
    profile_space(space, store, FAST, n_subnets=0, seed=0, passes=2, width_step=8, progress=False)
    passes = [r["pass"] for r in store.layer_records()]
    assert sorted(passes) != passes


def test_profile_space_counts_busy_runs(tmp_path, monkeypatch):
    space = create_space({**TINY_SPACE, "stages": TINY_SPACE["stages"][:1]})
    store = ProfileStore(tmp_path, device_fingerprint(FAST))
    monkeypatch.setattr(measurement, "load_average", lambda: 1000.0)

    summary = profile_space(space, store, FAST, n_subnets=2, seed=0, passes=1, width_step=8, progress=False)

    assert summary.busy_runs == summary.layers_measured + summary.subnets_measured
    assert all(r["measurement"]["load_avg_1m"] == 1000.0 for r in store.layer_records())


def test_measurement_from_dict_defaults_and_unknown_keys():
    m = measure_module(nn.ReLU(), (4,), MeasurementProtocol(warmup=0, repeats=1), record_operators=False)
    data = m.to_dict()
    del data["load_avg_1m"]
    assert profiling.Measurement.from_dict(data).load_avg_1m is None
    with pytest.raises(ValueError, match=r"missing keys \['median_ms'\]"):
        profiling.Measurement.from_dict({k: v for k, v in data.items() if k != "median_ms"})
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        profiling.Measurement.from_dict({**data, "extra": 1})


def test_profile_space_rejects_other_thread_count(tmp_path):
    space = create_space(TINY_SPACE)
    store = ProfileStore(tmp_path, device_fingerprint(MeasurementProtocol(threads=2)))
    with pytest.raises(ValueError, match="threads=2 but the protocol uses threads=1"):
        profile_space(space, store, FAST, n_subnets=2, seed=0, progress=False)


def test_busy_advice_depends_on_share():
    from predictors.profiling import busy_advice

    assert busy_advice(2, 966, "store").startswith("So few runs are unlikely to matter")
    assert busy_advice(200, 966, "store") == "Move store away and profile again on a quiet machine."


def test_measurement_reports_median_not_mean(monkeypatch):
    # One slow pass of five: the median ignores it, the mean does not.
    def fake_passes(run, device, passes):
        return [1.0, 1.0, 10.0, 1.0, 1.0][:passes] if passes == 5 else [0.5] * passes

    monkeypatch.setattr(measurement, "_time_passes", fake_passes)
    protocol = MeasurementProtocol(device="cpu", warmup=2, repeats=5, threads=1)
    result = measurement.measure_module(nn.Conv2d(1, 2, 1), (1, 4, 4), protocol, record_operators=False)
    assert result.median_ms == 1.0
    assert result.mean_ms == pytest.approx(2.8)
    assert result.repeats == 5

"""Timing with torch.compile and ONNX Runtime through measure_module."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from predictors.fingerprint import device_fingerprint
from predictors.profiling import MeasurementProtocol, RuntimeFailedError, measure_module
from predictors.protocol import HardwareConfigError
from predictors.runtimes import OnnxRuntimeRunner, create_runner, ort_node_records


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def protocol(runtime: str, **overrides) -> MeasurementProtocol:
    return MeasurementProtocol(runtime=runtime, **{"warmup": 1, "repeats": 3, "threads": 1, **overrides})


# -- ONNX Runtime ---------------------------------------------------------------------------------
def test_onnxruntime_measures_and_records_nodes():
    m = measure_module(tiny(), (3, 16, 16), protocol("onnxruntime", batch_size=2))
    assert m.median_ms > 0
    assert m.repeats == 3
    assert m.protocol["runtime"] == "onnxruntime"
    assert m.protocol["threads"] == 1
    kinds = {record["kind"] for record in m.operators}
    assert kinds == {"ort_node"}
    names = {record["name"] for record in m.operators}
    assert "Conv" in names
    conv = next(record for record in m.operators if record["name"] == "Conv")
    assert conv["input_shapes"][0] == [2, 3, 16, 16]
    assert conv["provider"] == "CPUExecutionProvider"
    assert conv["count"] == 1


def test_onnxruntime_session_uses_protocol_threads():
    runner = create_runner("onnxruntime", tiny().eval(), torch.randn(1, 3, 8, 8), torch.device("cpu"), threads=2)
    assert isinstance(runner, OnnxRuntimeRunner)
    assert runner.session.get_session_options().intra_op_num_threads == 2
    assert runner.session.get_providers() == ["CPUExecutionProvider"]


def test_onnxruntime_output_matches_pytorch():
    model = tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    runner = create_runner("onnxruntime", model, x, torch.device("cpu"), threads=1)
    runner.run()
    (output,) = runner.binding.copy_outputs_to_cpu()
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(output - expected).max() < 1e-4


def test_onnxruntime_without_records():
    m = measure_module(tiny(), (3, 8, 8), protocol("onnxruntime"), record_operators=False)
    assert m.operators == []


def test_onnxruntime_rejects_half_precision():
    with pytest.raises(HardwareConfigError, match="float32 models only.*'float16'"):
        MeasurementProtocol(runtime="onnxruntime", dtype="float16")


def test_onnxruntime_export_failure_named():
    class Unexportable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x.flatten(1)[:, :4].reshape(-1, 2, 2)).real

    with pytest.raises(RuntimeFailedError, match="hardware.runtime=onnxruntime.*Unexportable"):
        measure_module(Unexportable(), (1, 2, 2), protocol("onnxruntime"))


def test_ort_node_records_aggregate():
    trace = [
        {"cat": "Session", "name": "model_run", "dur": 50},
        {"cat": "Node", "name": "conv_fence_before", "dur": 0, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "a_kernel_time", "dur": 10,
         "args": {"op_name": "Conv", "provider": "CPUExecutionProvider", "input_type_shape": [{"float": [1, 3, 8, 8]}]}},
        {"cat": "Node", "name": "b_kernel_time", "dur": 5,
         "args": {"op_name": "Conv", "provider": "CPUExecutionProvider", "input_type_shape": [{"float": [1, 3, 8, 8]}]}},
        {"cat": "Node", "name": "c_kernel_time", "dur": 2,
         "args": {"op_name": "Relu", "provider": "CPUExecutionProvider", "input_type_shape": [{"float": [1, 8]}]}},
    ]
    records = ort_node_records(trace)
    assert len(records) == 2
    conv = records[0]
    assert conv["name"] == "Conv"
    assert conv["count"] == 2
    assert conv["duration_us"] == 15.0
    assert conv["input_shapes"] == [[1, 3, 8, 8]]
    assert records[1]["name"] == "Relu"


def test_fingerprint_differs_by_runtime():
    eager = device_fingerprint(protocol("eager"))
    onnx = device_fingerprint(protocol("onnxruntime"))
    assert eager != onnx


# -- torch.compile ------------------------------------------------------------------------------
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="torch.compile's inductor backend needs a C++ compiler (g++ or clang++) on CPU",
)


@needs_compiler
@pytest.mark.timeout(300)
def test_compile_measures_compiled_module():
    m = measure_module(tiny(), (3, 16, 16), protocol("compile"))
    assert m.median_ms > 0
    assert m.protocol["runtime"] == "compile"
    assert m.operators
    assert all(record["kind"] == "cpu_op" for record in m.operators)


def test_compile_failure_names_runtime_and_fix(monkeypatch):
    def broken(module, *args, **kwargs):
        def run(x):
            raise RuntimeError("no working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeFailedError, match=r"hardware.runtime=compile failed.*C\+\+ compiler.*hardware.runtime=eager"):
        measure_module(tiny(), (3, 8, 8), protocol("compile"))

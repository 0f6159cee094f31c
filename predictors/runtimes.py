"""The runtimes that :func:`predictors.profiling.measure_module` times: eager PyTorch, ``torch.compile``, ONNX Runtime.

A runner wraps one module and one input batch. Building it does the untimed preparation (compilation
for ``compile``; ONNX export and session creation for ``onnxruntime``). :meth:`Runner.run` is one
forward pass, which the caller times, and :meth:`Runner.operators` profiles one extra pass and
returns its operator records.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from predictors.profiler_records import ProfilingError, profile_operators

__all__ = [
    "Runner",
    "RuntimeFailedError",
    "EagerRunner",
    "CompiledRunner",
    "OnnxRuntimeRunner",
    "create_runner",
    "ort_node_records",
]

class RuntimeFailedError(ProfilingError):
    """A runtime that cannot run the module on this machine: compilation, export or session creation failed."""


class Runner(Protocol):
    """One module prepared for one runtime and one input batch."""

    def run(self) -> None:
        """Run one forward pass on the prepared input; on CUDA the caller synchronises."""

    def operators(self) -> list[dict[str, Any]]:
        """Profile one more forward pass and return its operator records (never empty)."""


class EagerRunner:
    """Plain PyTorch: the module is called as it is."""

    def __init__(self, module: nn.Module, x: torch.Tensor, device: torch.device) -> None:
        self.module, self.x, self.device = module, x, device

    def run(self) -> None:
        self.module(self.x)

    def operators(self) -> list[dict[str, Any]]:
        return profile_operators(self.module, self.x, self.device)


class CompiledRunner(EagerRunner):
    """``torch.compile`` with its default (inductor) backend.

    Compilation runs in the constructor, in one untimed pass under ``torch.inference_mode``, so
    the warm-up and the timed passes only run the compiled code. Dynamo's caches are reset first,
    because each new module would otherwise count as a recompilation of the same ``forward`` and,
    past Dynamo's recompile limit, silently run eagerly.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, device: torch.device) -> None:
        torch._dynamo.reset()
        try:
            compiled = torch.compile(module)
            with torch.inference_mode():
                compiled(x)
        except Exception as err:  # inductor raises many types: C++ compiler, Triton, lowering errors
            raise RuntimeFailedError(
                f"hardware.runtime=compile failed: torch.compile could not compile {type(module).__name__} on "
                f"{device} ({type(err).__name__}: {str(err)[:500]}). Its default inductor backend needs a working "
                "C++ compiler (gcc or clang) for CPU and Triton for CUDA; install them, or use hardware.runtime=eager."
            ) from err
        super().__init__(compiled, x, device)


class OnnxRuntimeRunner:
    """ONNX Runtime: the module is exported to ONNX once and run in an ``InferenceSession``.

    The export uses the TorchScript exporter, which takes about 0.04 s for a small convolution
    block where the ``torch.export``-based exporter takes about 1 s (both measured on a 2-core
    CPU with torch 2.14), and is checked against PyTorch's output. Inputs and outputs stay bound
    to the device with an ``IOBinding``, so a timed pass does not include copying the input.

    Args:
        module: the module in eval mode, float32.
        x: the input batch.
        device: ``cpu`` uses ``CPUExecutionProvider``, ``cuda:N`` uses ``CUDAExecutionProvider`` on GPU N.
        threads: intra-op threads of the session.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, device: torch.device, threads: int) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.device = device
        self.threads = threads
        self.providers = _providers(ort, device)
        self.model = _export(module, x)
        self.session = self._session(profile_prefix=None)
        self.input = x.detach().cpu().numpy()
        self.binding = self._bind(self.session)

    def _session(self, profile_prefix: str | None) -> Any:
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            return self.ort.InferenceSession(self.model, options, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own exception types from C++
            raise RuntimeFailedError(
                f"hardware.runtime=onnxruntime failed to create a session on {self.device} with {self.providers} "
                f"({type(err).__name__}: {str(err)[:500]}); check the onnxruntime installation, or use "
                "hardware.runtime=eager."
            ) from err

    def _bind(self, session: Any) -> Any:
        device_type = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = self.device.index or 0
        binding = session.io_binding()
        value = self.ort.OrtValue.ortvalue_from_numpy(self.input, device_type, device_id)
        binding.bind_ortvalue_input(session.get_inputs()[0].name, value)
        binding.bind_output(session.get_outputs()[0].name, device_type, device_id)
        self._input_value = value  # the binding does not keep the input alive
        return binding

    def run(self) -> None:
        # NOTE: on CUDA this relies on Run synchronising the CUDA stream before it returns, ONNX
        # Runtime's default; the CUDA path has not been run on a GPU here.
        self.session.run_with_iobinding(self.binding)

    def operators(self) -> list[dict[str, Any]]:
        """Run one pass in a second, profiling session and return ONNX Runtime's per-node records."""
        with tempfile.TemporaryDirectory() as folder:
            session = self._session(profile_prefix=str(Path(folder) / "ort_profile"))
            binding = self._bind(session)
            session.run_with_iobinding(binding)
            trace = json.loads(Path(session.end_profiling()).read_text())
        records = ort_node_records(trace)
        if not records:
            raise ProfilingError(
                f"ONNX Runtime's profiler recorded no node events on {self.device}; check that the onnxruntime "
                "build supports profiling (SessionOptions.enable_profiling)."
            )
        return records


def _providers(ort: Any, device: torch.device) -> list[Any]:
    available = ort.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeFailedError(
            f"hardware.runtime=onnxruntime on {device} needs ONNX Runtime's CUDAExecutionProvider, but this "
            f"installation offers {available}; install onnxruntime-gpu in place of onnxruntime, or use "
            "hardware.device=cpu."
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def _export(module: nn.Module, x: torch.Tensor) -> bytes:
    """Export ``module`` to ONNX for input ``x`` (fixed shape), check it against PyTorch, and return the model bytes."""
    from nas.export import ExportError, export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "module.onnx"
        try:
            export_onnx(module, x, path, check=True, dynamic_batch=False, dynamo=False)
        except ExportError as err:
            raise RuntimeFailedError(f"hardware.runtime=onnxruntime: {err}") from err
        except Exception as err:  # the exporter raises many types for unsupported operators
            raise RuntimeFailedError(
                f"hardware.runtime=onnxruntime failed to export {type(module).__name__} to ONNX "
                f"({type(err).__name__}: {str(err)[:500]}); use hardware.runtime=eager for this model."
            ) from err
        return path.read_bytes()


def _shapes(values: Sequence[Mapping[str, Any]] | None) -> list[list[int]]:
    """Turn ONNX Runtime's ``[{"float": [1, 3, 8, 8]}, ...]`` into ``[[1, 3, 8, 8], ...]``."""
    return [list(next(iter(value.values()))) for value in values or [] if value]


def ort_node_records(trace: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate the node events of an ONNX Runtime profile (``end_profiling()``'s JSON) into records.

    Each record has ``kind="ort_node"``, ``name`` (the ONNX operator, for example ``Conv``),
    ``provider``, ``count``, ``duration_us`` (summed over ``count`` calls) and ``input_shapes``.
    Nodes with the same operator, provider and input shapes share a record.
    """
    totals: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(dict)
    for event in trace:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        shapes = _shapes(args.get("input_type_shape"))
        key = (str(args.get("op_name")), str(args.get("provider")), json.dumps(shapes))
        record = totals[key]
        if not record:
            record.update(kind="ort_node", name=key[0], provider=key[1], count=0, duration_us=0.0, input_shapes=shapes)
        record["count"] += 1
        record["duration_us"] = round(record["duration_us"] + float(event.get("dur", 0.0)), 3)
    return list(totals.values())


def create_runner(runtime: str, module: nn.Module, x: torch.Tensor, device: torch.device, threads: int) -> Runner:
    """Prepare ``module`` for ``runtime`` ("eager", "compile" or "onnxruntime") on input ``x``.

    Raises:
        RuntimeFailedError: if compilation, export or session creation fails, naming the fix.
        ValueError: for an unknown runtime.
    """
    if runtime == "eager":
        return EagerRunner(module, x, device)
    if runtime == "compile":
        return CompiledRunner(module, x, device)
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(module, x, device, threads)
    raise ValueError(f"Unknown runtime {runtime!r}; allowed values are ['eager', 'compile', 'onnxruntime'].")

"""Operator and kernel records from one ``torch.profiler`` pass.

On CPU a record is one operator name and input-shape combination with its call count and CPU
times. On CUDA each kernel launch also gets a record with its grid, block, registers, shared
memory and the occupancy that the profiler estimates, which is what explains wave-quantisation
tails on a GPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch import profiler as torch_profiler

# Kineto, torch.profiler's backend, writes two status lines to stderr for every profiled pass, which
# buries progress bars and logs. Level 6 silences them; it is read when profiling starts, so setting
# it here works after torch is imported. Set KINETO_LOG_LEVEL yourself to see them.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

__all__ = [
    "ProfilingError",
    "cpu_operator_records",
    "kernel_records_from_trace",
    "profile_operators",
    "synchronize",
]


class ProfilingError(RuntimeError):
    """A measurement that cannot be trusted, such as a profiled pass with no operator records."""


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device``; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_profiler(module: nn.Module, x: torch.Tensor, device: torch.device) -> Any:
    """Run one forward pass under ``torch.profiler`` and return the finished profiler."""
    activities = [torch_profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch_profiler.ProfilerActivity.CUDA)
    with torch_profiler.profile(activities=activities, record_shapes=True) as prof:
        module(x)
        synchronize(device)
    return prof


def profile_operators(module: nn.Module, x: torch.Tensor, device: torch.device) -> list[dict[str, Any]]:
    """Profile one forward pass and return its operator records (plus kernel records on CUDA).

    Raises:
        ProfilingError: if no CPU operator was recorded, or on CUDA if no kernel was recorded.
    """
    prof = _run_profiler(module, x, device)
    records = cpu_operator_records(prof.key_averages(group_by_input_shape=True))
    if not records:
        raise ProfilingError(
            f"torch.profiler recorded no operator events for {type(module).__name__} on {device}; "
            "check that no other profiler is active in this process."
        )
    if device.type != "cuda":
        return records

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    kernels = kernel_records_from_trace(trace, sm_count)
    if not kernels:
        raise ProfilingError(
            f"torch.profiler recorded no CUDA kernel events for {type(module).__name__} on {device}; "
            "CUPTI may be missing or blocked (check that libcupti is on the library path and that "
            "profiling is permitted for this user)."
        )
    return records + kernels


def cpu_operator_records(events: Any) -> list[dict[str, Any]]:
    """Turn ``key_averages(group_by_input_shape=True)`` events into JSON-ready dicts.

    Each record has ``kind="cpu_op"``, ``name``, ``count``, ``self_cpu_us``, ``cpu_total_us``
    (microseconds, summed over ``count`` calls) and ``input_shapes``.
    """
    records = []
    for event in events:
        records.append(
            {
                "kind": "cpu_op",
                "name": str(event.key),
                "count": int(event.count),
                "self_cpu_us": round(float(event.self_cpu_time_total), 3),
                "cpu_total_us": round(float(event.cpu_time_total), 3),
                "input_shapes": [list(shape) for shape in (event.input_shapes or [])],
            }
        )
    return records


# Argument names of CUDA kernel events in the Chrome trace that Kineto (torch.profiler's backend)
# writes, as in libkineto's ChromeTraceLogger. "shared memory" is static plus dynamic, in bytes.
_KERNEL_ARGS = {
    "grid": "grid",
    "block": "block",
    "registers per thread": "registers_per_thread",
    "shared memory": "shared_memory_bytes",
    "blocks per SM": "blocks_per_sm",
    "warps per SM": "warps_per_sm",
    "est. achieved occupancy %": "est_occupancy_pct",
    "stream": "stream",
}


def kernel_records_from_trace(trace: Mapping[str, Any], sm_count: int | None) -> list[dict[str, Any]]:
    """Extract one record per CUDA kernel launch from a Chrome trace written by ``torch.profiler``.

    Each record has ``kind="kernel"``, ``name``, ``duration_us``, the launch fields in
    ``_KERNEL_ARGS`` (``None`` when the trace lacks one) and the device's ``sm_count``.
    """
    records = []
    for event in trace.get("traceEvents", []):
        # Kineto versions differ in the case of this category: "Kernel" or "kernel".
        if str(event.get("cat", "")).lower() != "kernel":
            continue
        args = event.get("args", {})
        record: dict[str, Any] = {"kind": "kernel", "name": event.get("name"), "duration_us": event.get("dur")}
        for source, target in _KERNEL_ARGS.items():
            record[target] = args.get(source)
        record["sm_count"] = sm_count
        records.append(record)
    return records

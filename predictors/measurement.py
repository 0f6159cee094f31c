"""Timing one module: :func:`measure_module` and the :class:`Measurement` it returns.

:func:`measure_module` warms up, times ``repeats`` forward passes with ``time.perf_counter``
(synchronising CUDA around each), and reports the median with its spread. One extra pass under
``torch.profiler`` keeps per-operator records on CPU and per-kernel launch records on CUDA, which
the predictor's features use to explain tails.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn

from predictors.fingerprint import device_fingerprint, fingerprint_id
from predictors.profiler_records import synchronize
from predictors.protocol import MeasurementProtocol, check_device_available
from predictors.runtimes import create_runner

__all__ = ["Measurement", "load_average", "measure_module", "thread_count"]


@dataclass
class Measurement:
    """Latency of one module for one protocol, with the profiler's operator records.

    All times are per forward pass of one batch, in milliseconds. ``protocol`` is the protocol's
    dict with ``threads`` replaced by the thread count actually used. ``load_avg_1m`` is the
    operating system's 1-minute load average (runnable tasks) when timing started, or ``None``
    where the platform does not report it. A load above the logical core count means that other
    processes competed for the CPU, so the latency may include time spent waiting for a core.
    """

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    repeats: int
    operators: list[dict[str, Any]]
    protocol: dict[str, Any]
    fingerprint_id: str
    date: str
    load_avg_1m: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        """Build a measurement from :meth:`to_dict` output; unknown or missing keys raise ``ValueError``.

        Keys of fields with a default may be missing.
        """
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        unknown = sorted(set(data) - set(names))
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
        if unknown or missing:
            raise ValueError(f"Invalid measurement record: unknown keys {unknown}, missing keys {missing}.")
        return cls(**dict(data))


# -- timing ---------------------------------------------------------------------------------


@contextmanager
def thread_count(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for the block, restore it after, and yield the count in use."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _time_passes(run: Callable[[], Any], device: torch.device, passes: int) -> list[float]:
    """Call ``run`` (one forward pass) ``passes`` times and return each call's wall time in milliseconds."""
    times = []
    for _ in range(passes):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_module(
    module: nn.Module,
    input_shape: tuple[int, ...],
    protocol: MeasurementProtocol,
    record_operators: bool = True,
    inputs: torch.Tensor | None = None,
) -> Measurement:
    """Time ``module`` on random input of shape ``(protocol.batch_size, *input_shape)`` with ``protocol.runtime``.

    ``inputs`` replaces the random input with a batch of that shape. Pass real images to time a
    network whose work depends on its input, such as a gated network at batches above 1, where
    each image's selection widens the batch's union of channels.

    The module is moved to the protocol's device and dtype and set to eval mode in place. Timing
    runs under ``torch.inference_mode``: ``warmup`` untimed passes, then ``repeats`` timed passes.
    With ``record_operators``, one more pass runs under a profiler and its records become
    ``Measurement.operators``; that pass is not part of the timing.

    Runtimes (see :mod:`predictors.runtimes`): "eager" calls the module. "compile" runs
    ``torch.compile`` and compiles in one extra untimed pass before the warm-up. Compilation
    dominates the call: 41 s for a small MobileNetV3 subnet on a 2-core CPU, so profiling a whole
    space this way takes hours. "onnxruntime" exports the module to ONNX and times an ONNX Runtime
    session with ``threads`` intra-op threads, and its operator records come from ONNX Runtime's
    own profiler (``kind="ort_node"``).

    Raises:
        DeviceUnavailableError: if the protocol's CUDA device is not present.
        RuntimeFailedError: if the runtime cannot prepare the module (compilation, export or session failed).
        ProfilingError: if the profiled pass recorded no operator (CPU), kernel (CUDA) or node (ONNX Runtime) events.
        ValueError: if ``inputs`` does not have the shape ``(protocol.batch_size, *input_shape)``.
    """
    check_device_available(protocol.device)
    device = torch.device(protocol.device)
    module = module.to(device=device, dtype=protocol.torch_dtype).eval()
    expected = (protocol.batch_size, *input_shape)
    if inputs is None:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(expected, generator=generator)
    elif tuple(inputs.shape) != expected:
        raise ValueError(f"measure_module inputs must have shape {expected} (batch size, then input_shape), "
                         f"but got {tuple(inputs.shape)}.")
    x = inputs.to(device, protocol.torch_dtype)

    with thread_count(protocol.threads) as threads:
        runner = create_runner(protocol.runtime, module, x, device, threads)
        load = load_average()
        with torch.inference_mode():
            _time_passes(runner.run, device, protocol.warmup)
            times = np.asarray(_time_passes(runner.run, device, protocol.repeats))
            operators = runner.operators() if record_operators else []

    p10, p25, p75, p90 = np.percentile(times, [10, 25, 75, 90])
    return Measurement(
        median_ms=float(np.median(times)),
        mean_ms=float(times.mean()),
        p10_ms=float(p10),
        p90_ms=float(p90),
        iqr_ms=float(p75 - p25),
        repeats=protocol.repeats,
        operators=operators,
        protocol={**protocol.to_dict(), "threads": threads},
        fingerprint_id=fingerprint_id(device_fingerprint(dataclasses.replace(protocol, threads=threads))),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        load_avg_1m=load,
    )


def load_average() -> float | None:
    """Return the 1-minute system load average, or ``None`` where ``os.getloadavg`` is missing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None

"""The measurement protocol: device, runtime, batch size, threads, dtype, warm-up and repeats.

A protocol comes from the Hydra ``hardware`` config group (``conf/hardware/*.yaml``). Every
measurement stores its protocol, so records taken with different settings never mix silently.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "RUNTIMES",
    "TIMING_KEYS",
    "DeviceUnavailableError",
    "HardwareConfigError",
    "MeasurementProtocol",
    "check_device_available",
    "timing_value",
]

_DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")

RUNTIMES = ("eager", "compile", "onnxruntime")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HardwareConfigError(ValueError):
    """An invalid ``hardware`` config: an unknown key or a value outside the allowed ones."""


class DeviceUnavailableError(HardwareConfigError):
    """The protocol names a device that this machine does not have."""


# The protocol fields that change what a latency is; warm-up and repeat counts change only its noise.
TIMING_KEYS = ("device", "runtime", "batch_size", "threads", "dtype")


def timing_value(settings: Mapping[str, Any], key: str) -> Any:
    """Return ``settings[key]`` as timings compare it: "cuda" and "cuda:0" name the same kind of device."""
    value = settings.get(key)
    return str(value).split(":")[0] if key == "device" and value is not None else value


@dataclass(frozen=True)
class MeasurementProtocol:
    """Settings of a latency measurement: device, runtime, batch size, threads and precision.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        runtime: ``"eager"`` (PyTorch), ``"compile"`` (``torch.compile``) or ``"onnxruntime"`` (an ONNX
            Runtime session on the exported module; float32 only).
        batch_size: images per forward pass; latencies are per pass, not per image.
        threads: intra-op threads (``torch.set_num_threads``) during measurement; ``None`` keeps
            torch's current setting, and the count actually used is recorded either way.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for weights and inputs.
        warmup: untimed passes before timing.
        repeats: timed passes; the median over them is the latency.
    """

    device: str = "cpu"
    runtime: str = "eager"
    batch_size: int = 1
    threads: int | None = None
    dtype: str = "float32"
    warmup: int = 10
    repeats: int = 30

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.fullmatch(self.device):
            raise HardwareConfigError(f"hardware.device must be 'cpu', 'cuda' or 'cuda:N', but got {self.device!r}.")
        if self.runtime not in RUNTIMES:
            raise HardwareConfigError(f"hardware.runtime must be one of {list(RUNTIMES)}, but got {self.runtime!r}.")
        if self.dtype not in DTYPES:
            raise HardwareConfigError(f"hardware.dtype must be one of {list(DTYPES)}, but got {self.dtype!r}.")
        if self.runtime == "onnxruntime" and self.dtype != "float32":
            raise HardwareConfigError(
                f"hardware.runtime=onnxruntime times float32 models only, but hardware.dtype={self.dtype!r}; "
                "set hardware.dtype=float32, or use hardware.runtime=eager or compile for reduced precision."
            )
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("warmup", self.warmup, minimum=0)
        _check_int("repeats", self.repeats, minimum=1)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1, hint="or null for torch's default")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MeasurementProtocol:
        """Build a protocol from the Hydra ``hardware`` node and check that its device exists.

        Raises:
            HardwareConfigError: on an unknown key or an invalid value.
            DeviceUnavailableError: if the config names a CUDA device that is not present.
        """
        if not isinstance(cfg, Mapping):
            raise HardwareConfigError(f"The hardware config must be a mapping, but got {type(cfg).__name__}: {cfg!r}.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise HardwareConfigError(f"Unknown keys {unknown} in hardware config; allowed keys are {names}.")
        protocol = cls(**{str(key): value for key, value in cfg.items()})
        check_device_available(protocol.device)
        return protocol

    @property
    def uses_torch_threads(self) -> bool:
        """Whether this CPU protocol times with torch's thread count (``threads`` null), which the environment sets."""
        return self.threads is None and self.device == "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        suffix = f" ({hint})" if hint else ""
        raise HardwareConfigError(f"hardware.{name} must be an integer >= {minimum}{suffix}, but got {value!r}.")


def check_device_available(device: str) -> None:
    """Raise :class:`DeviceUnavailableError` with the fix when ``device`` names a CUDA device this machine lacks."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"hardware.device={device!r} needs CUDA, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). Use hardware=cpu, or run on a machine with "
            "an NVIDIA GPU and a CUDA build of torch."
        )
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"hardware.device={device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}."
        )

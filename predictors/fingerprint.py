"""Device fingerprints: which hardware and software a latency measurement belongs to.

A fingerprint is a flat JSON-ready dict. Measurements from devices whose fingerprint ids differ
never mix, because the profile store keeps one folder per id. Every field is best effort, so a
field that the platform does not expose is recorded as ``None`` instead of raising.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from predictors.protocol import MeasurementProtocol

__all__ = [
    "FINGERPRINT_ID_FIELDS",
    "device_fingerprint",
    "fingerprint_id",
    "fingerprints_match",
    "simd_width_floats",
]

logger = logging.getLogger(__name__)

# Fields that change speed and therefore identify a device. "threads" is left out because the
# profile store keeps records with different thread counts side by side and filters them on read.
# "name" repeats other fields, and "created" does not change speed.
FINGERPRINT_ID_FIELDS = (
    "device_type",
    "cpu_model",
    "cpu_arch",
    "simd_flags",
    "l1d_cache_bytes",
    "l2_cache_bytes",
    "l3_cache_bytes",
    "logical_cores",
    "physical_cores",
    "gpu_name",
    "gpu_sm_count",
    "gpu_compute_capability",
    "gpu_memory_bytes",
    "gpu_driver_version",
    "cuda_version",
    "cudnn_version",
    "torch_version",
    "runtime",
    "dtype",
)

# CPU flags that set the width or kind of vector instructions that convolution kernels use.
_SIMD_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "neon", "asimd", "sve", "vnni")

_CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")


def device_fingerprint(protocol: MeasurementProtocol) -> dict[str, Any]:
    """Describe the device that ``protocol`` measures on.

    Returns:
        A flat dict. CPU fields: model, SIMD flags, cache sizes in bytes and core counts. GPU
        fields, ``None`` on CPU: name, SM count, compute capability, memory in bytes, and the
        driver, CUDA and cuDNN versions. Both: ``torch_version``, ``runtime``, ``dtype``,
        ``threads`` (the intra-op thread count that a measurement with this protocol uses),
        ``name`` (a short label for reports) and ``created`` (ISO 8601 UTC).
    """
    device = torch.device(protocol.device)
    fp: dict[str, Any] = {"device_type": device.type}
    fp.update(_cpu_fields())
    fp["simd_flags"] = list(fp["simd_flags"])
    fp.update(_gpu_fields(device))
    fp["torch_version"] = torch.__version__
    fp["runtime"] = protocol.runtime
    fp["dtype"] = protocol.dtype
    fp["threads"] = protocol.threads if protocol.threads is not None else torch.get_num_threads()
    fp["name"] = _display_name(fp)
    fp["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return fp


def _display_name(fp: dict[str, Any]) -> str:
    """Return a short human-readable device name for plots and reports, such as ``"NVIDIA H100 (cuda)"``."""
    if fp.get("gpu_name"):
        return f"{fp['gpu_name']} (cuda)"
    threads = fp.get("threads")
    return f"{fp.get('cpu_model') or 'unknown CPU'} ({threads} thread{'' if threads == 1 else 's'})"


def fingerprint_id(fp: dict[str, Any]) -> str:
    """Return a 12-hex-digit hash over the fields in :data:`FINGERPRINT_ID_FIELDS`.

    Missing fields hash as ``None``, so a fingerprint written by an older version that lacks a
    field gets a different id instead of a false match.
    """
    identity = {name: fp.get(name) for name in FINGERPRINT_ID_FIELDS}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprints_match(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, list[str]]:
    """Compare two fingerprints on the speed-relevant fields.

    Returns:
        ``(True, [])`` when they identify the same device, else ``(False, names)`` with the names
        of the fields in :data:`FINGERPRINT_ID_FIELDS` whose values differ.
    """
    differing = [name for name in FINGERPRINT_ID_FIELDS if a.get(name) != b.get(name)]
    return not differing, differing


def simd_width_floats(fp: dict[str, Any]) -> int:
    """Return the float32 lanes of the widest vector unit in ``fp["simd_flags"]``.

    16 for AVX-512F, 8 for AVX or AVX2, 4 for NEON/ASIMD, SSE or SVE, and 1 when no flag is known.
    """
    flags = set(fp.get("simd_flags") or [])
    if "avx512f" in flags:
        return 16
    if flags & {"avx", "avx2"}:
        return 8
    # NOTE: SVE vector length is chosen by the chip (128 to 2048 bits); 4 lanes is the NEON
    # width that every SVE core also has, so this underestimates wide-SVE parts.
    if flags & {"neon", "asimd", "sve", "sve2"} or any(flag.startswith("sse") for flag in flags):
        return 4
    return 1


# -- CPU ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cpu_fields() -> dict[str, Any]:
    """Collect the CPU fields once per process, because py-cpuinfo takes about a second."""
    info = _cpuinfo()
    flags = info.get("flags") or _proc_cpuinfo_flags()
    caches = _sysfs_cache_sizes()
    return {
        "cpu_model": info.get("brand_raw") or platform.processor() or None,
        "cpu_arch": platform.machine() or None,
        "simd_flags": sorted(flag for flag in flags if flag.startswith(_SIMD_PREFIXES)),
        "l1d_cache_bytes": caches.get("l1d") or _as_int(info.get("l1_data_cache_size")),
        "l2_cache_bytes": caches.get("l2") or _as_int(info.get("l2_cache_size")),
        "l3_cache_bytes": caches.get("l3") or _as_int(info.get("l3_cache_size")),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
    }


def _cpuinfo() -> dict[str, Any]:
    try:
        import cpuinfo

        return dict(cpuinfo.get_cpu_info())
    except Exception as err:  # py-cpuinfo shells out to platform tools that may be missing.
        logger.warning("py-cpuinfo failed (%s); CPU model and flags fall back to /proc/cpuinfo.", err)
        return {}


def _proc_cpuinfo_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return value.split()
    return []


def _sysfs_cache_sizes() -> dict[str, int]:
    """Read cache sizes in bytes from Linux sysfs: keys ``l1d``, ``l2``, ``l3``."""
    sizes: dict[str, int] = {}
    if not _CACHE_SYSFS.is_dir():
        return sizes
    for index in sorted(_CACHE_SYSFS.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size is None:
            continue
        name = "l1d" if level == "1" else f"l{level}"
        sizes.setdefault(name, size)
    return sizes


def _parse_size(text: str) -> int | None:
    """Parse sysfs sizes such as ``48K`` or ``2048K`` into bytes."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if not text:
        return None
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def _as_int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return _parse_size(value.replace(" ", "").replace("iB", "").replace("B", ""))
        except ValueError:
            return None
    return None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception as err:  # psutil raises platform-specific errors on containers.
        logger.debug("psutil could not count physical cores: %s", err)
        return None


# -- GPU ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _gpu_fields(device: torch.device) -> dict[str, Any]:
    """Collect the GPU fields once per device, because the driver query starts a process."""
    empty: dict[str, Any] = {
        "gpu_name": None,
        "gpu_sm_count": None,
        "gpu_compute_capability": None,
        "gpu_memory_bytes": None,
        "gpu_driver_version": None,
        "cuda_version": None,
        "cudnn_version": None,
    }
    if device.type != "cuda" or not torch.cuda.is_available():
        return empty
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "gpu_name": props.name,
        "gpu_sm_count": props.multi_processor_count,
        "gpu_compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_bytes": props.total_memory,
        "gpu_driver_version": _nvidia_driver_version(index),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
    }


def _nvidia_driver_version(index: int) -> str | None:
    """Ask ``nvidia-smi`` for the driver version; ``None`` when the tool is missing or fails."""
    command = ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("nvidia-smi did not report a driver version: %s", err)
        return None
    return result.stdout.strip() or None

"""Train and evaluate the latency predictor on latencies measured elsewhere.

Input is a CSV with one measured subnet per row:

- ``arch``: the architecture as JSON in the space's encoding (Once-for-All's ``ks``/``e``/``d``/``r``
  for the MobileNetV3 space);
- ``latency_ms``: measured latency in ms of one forward pass of ``batch_size`` images;
- ``device``: the device name, for example ``NVIDIA GeForce RTX 2080 Ti``;
- ``batch_size``: images per forward pass.

Rows are grouped per device. Each architecture becomes its layer list through the space's
``arch_from_dict`` and ``layers``, and then network features (there is no per-layer lookup table
here, so the network model works from features alone). The predictor trains on ``n_train`` rows
per device and is evaluated on the rest, next to a MACs-linear fit on the same training rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nas.spaces.base import SearchSpace
from nas.spaces.layers import LayerSpec
from predictors.evaluate import evaluate_predictions, fit_macs_linear
from predictors.features import HardwareFacts
from predictors.xgb import LatencyPredictor, XGBParams

__all__ = [
    "EXTERNAL_COLUMNS",
    "KNOWN_GPU_SM_COUNTS",
    "ExternalDataError",
    "ExternalResult",
    "evaluate_external",
    "fit_external_device",
    "hardware_facts_for",
    "layer_lists_for",
    "read_external_csv",
]

logger = logging.getLogger(__name__)

EXTERNAL_COLUMNS = ("arch", "latency_ms", "device", "batch_size")
# Streaming multiprocessors per GPU: the RTX 2080 Ti (Turing TU102, 4352 CUDA cores at 64 per SM)
# has 68 and the Tesla P40 (Pascal GP102, 3840 CUDA cores at 128 per SM) has 30. Pass
# ``sm_counts`` for other GPUs.
KNOWN_GPU_SM_COUNTS = {"NVIDIA GeForce RTX 2080 Ti": 68, "NVIDIA Tesla P40": 30}
# Sized for about a thousand training rows: more and deeper trees than the on-device network model
# (300 trees of depth 3), because without a lookup table this model carries every shape effect.
EXTERNAL_NETWORK_PARAMS = XGBParams(n_estimators=1000, max_depth=4, learning_rate=0.03, subsample=0.8, colsample_bytree=0.8)


class ExternalDataError(ValueError):
    """An external latency CSV that cannot be used as given."""


@dataclass
class ExternalResult:
    """Held-out accuracy on one device: the predictor's metrics and the MACs-linear fit's."""

    device: str
    n_train: int
    n_test: int
    predictor: dict[str, Any]
    macs_linear: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "predictor": self.predictor,
            "macs_linear": self.macs_linear,
        }


def read_external_csv(path: str | Path) -> pd.DataFrame:
    """Read and check an external latency CSV; see the module docstring for its columns."""
    path = Path(path)
    if not path.is_file():
        raise ExternalDataError(f"External latency CSV {path} not found; pass the path of an existing file.")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise ExternalDataError(f"{path} is empty; expected a header with columns {list(EXTERNAL_COLUMNS)} "
                                "and one row per measured subnet.") from err
    missing = [column for column in EXTERNAL_COLUMNS if column not in frame.columns]
    if missing:
        raise ExternalDataError(f"{path} is missing columns {missing}; expected columns {list(EXTERNAL_COLUMNS)}.")
    if frame.empty:
        raise ExternalDataError(f"{path} has a header but no rows; add one row per measured subnet.")
    latencies = pd.to_numeric(frame["latency_ms"], errors="coerce")
    bad = frame.index[~(latencies > 0)].tolist()
    if bad:
        raise ExternalDataError(f"{path} has non-positive or non-numeric latency_ms in rows {bad[:10]} (0-based data rows).")
    frame["latency_ms"] = latencies.astype(float)
    return frame


def hardware_facts_for(device: str, sm_counts: Mapping[str, int] | None = None) -> HardwareFacts:
    """Return GPU facts for a device name, from ``sm_counts`` or :data:`KNOWN_GPU_SM_COUNTS`."""
    table = {**KNOWN_GPU_SM_COUNTS, **(sm_counts or {})}
    if device not in table:
        raise ExternalDataError(
            f"SM count of device {device!r} is unknown; known devices are {sorted(table)}. "
            "Pass sm_counts={device_name: streaming_multiprocessors}."
        )
    return HardwareFacts(device="cuda", sm_count=int(table[device]))


def layer_lists_for(space: SearchSpace, arch_texts: Sequence[str]) -> list[list[LayerSpec]]:
    """Parse each JSON architecture with ``space.arch_from_dict`` and return its layers (cached per text)."""
    cache: dict[str, list[LayerSpec]] = {}
    out = []
    for row, text in enumerate(arch_texts):
        if text not in cache:
            try:
                arch = space.arch_from_dict(json.loads(text))
            except (json.JSONDecodeError, ValueError) as err:
                raise ExternalDataError(f"Row {row}: arch {text[:120]!r} is not valid for space {space.name!r}: "
                                        f"{str(err).rstrip('.')}. Pass the space whose encoding the arch column uses.") from err
            cache[text] = space.layers(arch)
        out.append(cache[text])
    return out


def fit_external_device(
    layer_lists: Sequence[Sequence[LayerSpec]],
    latency_ms: np.ndarray,
    hw: HardwareFacts,
    batch_size: int,
    seed: int,
    network_params: XGBParams | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> LatencyPredictor:
    """Train a feature-only :class:`LatencyPredictor` on one device's rows (no layer measurements)."""
    records = [
        {"key": str(i), "layers": [layer.to_dict() for layer in layers], "latency_ms": float(ms)}
        for i, (layers, ms) in enumerate(zip(layer_lists, latency_ms))
    ]
    predictor = LatencyPredictor(network_params=network_params or EXTERNAL_NETWORK_PARAMS, seed=seed, metadata=metadata)
    return predictor.fit([], records, hw, batch_size=batch_size)


def _split(n_rows: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 10 <= n_train < n_rows:
        raise ExternalDataError(f"n_train must be in [10, {n_rows - 1}] for a device with {n_rows} rows, but got {n_train}.")
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def evaluate_external(
    space: SearchSpace,
    frame: pd.DataFrame,
    n_train: int,
    seed: int = 0,
    sm_counts: Mapping[str, int] | None = None,
    network_params: XGBParams | None = None,
    max_test: int | None = None,
) -> list[ExternalResult]:
    """Fit on ``n_train`` random rows per device and evaluate on the others (at most ``max_test``).

    Args:
        space: the space whose encoding the ``arch`` column uses.
        frame: rows from :func:`read_external_csv`.
        n_train: training rows per device; a seeded permutation picks them.
        seed: seed of the split and the models.
        sm_counts: SM counts of GPUs missing from :data:`KNOWN_GPU_SM_COUNTS`.
        max_test: evaluate on at most this many held-out rows per device (``None``: all of them).

    Returns:
        One :class:`ExternalResult` per device, in order of first appearance.
    """
    if frame.empty:
        raise ExternalDataError("The external latency frame has no rows; read a CSV with measured subnets first.")
    results = []
    for device, rows in frame.groupby("device", sort=False):
        batch_sizes = rows["batch_size"].unique()
        if len(batch_sizes) != 1:
            raise ExternalDataError(f"Device {device!r} has rows with several batch sizes {sorted(batch_sizes)}; split the CSV per batch size.")
        hw = hardware_facts_for(str(device), sm_counts)
        layer_lists = layer_lists_for(space, rows["arch"].tolist())
        latency = rows["latency_ms"].to_numpy(dtype=np.float64)
        train, test = _split(len(rows), n_train, seed)
        if max_test is not None:
            test = test[:max_test]

        logger.info("Device %s: training on %d rows, testing on %d.", device, len(train), len(test))
        predictor = fit_external_device(
            [layer_lists[i] for i in train], latency[train], hw, int(batch_sizes[0]), seed, network_params,
            metadata={"space": space.name, "space_hash": space.config_hash()},
        )
        predicted = predictor.predict([layer_lists[i] for i in test])
        metrics = evaluate_predictions(latency[test], predicted.mean_ms, predicted.low_ms, predicted.high_ms)

        macs = np.array([sum(layer.macs for layer in layers) for layers in layer_lists], dtype=np.float64)
        macs_fit = fit_macs_linear(macs[train], latency[train])
        macs_metrics = evaluate_predictions(latency[test], macs_fit(macs[test]))
        results.append(ExternalResult(str(device), len(train), len(test), metrics, macs_metrics))
    return results

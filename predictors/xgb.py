"""The XGBoost latency predictor: a layer model, a network model and conformal intervals.

Model structure:

1. A lookup table (LUT) stores the median measured latency of every profiled layer.
2. The layer model, an XGBoost regressor on :func:`~predictors.features.layer_features`, predicts
   log latency of a layer; it is trained on the LUT, width sweeps included, so it learns the SIMD
   and wave staircases and fills in layers that were never measured.
3. A non-negative linear base, fitted by least squares on the training subnets, maps network
   features (with a LUT: the LUT sum and the layer count; without: the summed work features) to
   milliseconds.
4. The network model, an XGBoost regressor on the network features, predicts log(measured / base),
   the share of latency that neither the layers alone nor the linear base explain (operator fusion,
   cache reuse between layers, framework overhead).
5. Normalized split-conformal intervals (:mod:`predictors.conformal`): a scale model, an
   XGBoost regressor of the out-of-fold |log residual| on the network features and the size of the
   network model's correction, sets each architecture's interval width in log space. Out-of-fold
   residuals divided by that scale give the lower and upper quantiles for the nominal level.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from scipy.optimize import nnls

from nas.files import write_json_atomic
from nas.spaces.layers import LayerSpec
from predictors.conformal import INTERVAL_METHOD, ScaleModel, fit_normalized_conformal
from predictors.features import (
    OP_GROUPS,
    HardwareFacts,
    NetworkFeaturizer,
    frame_to_matrix,
    layer_feature_names,
    layer_features,
    network_feature_names,
)

__all__ = ["LatencyPredictor", "Prediction", "PredictorError", "PredictorNotFoundError", "PredictorVersionError", "XGBParams", "MIN_TRAIN_SUBNETS", "REBUILD_HINT", "write_json_atomic"]

logger = logging.getLogger(__name__)

REBUILD_HINT = "delete it to have it rebuilt, or add predictor.rebuild=true to the command"
DOCUMENT_KIND = "tailnas.latency_predictor"
# Metadata keys stored at the top level of the predictor file.
METADATA_KEYS = ("fingerprint", "protocol", "space", "space_hash", "training")

# Fewer subnets than this leave too few out-of-fold residuals for a 90% interval.
MIN_TRAIN_SUBNETS = 10
# The change that the current format_version made, named in the error on older files.
FORMAT_CHANGE = ("version 2 stores the scale model that sets each architecture's interval width; version 3 "
                 "computes depthwise convolutions' GPU features over output elements and squeeze-and-excitation's "
                 "SIMD padding per part, so older models read other feature values; version 4 weighs each "
                 "training subnet once in the interval calibration, not once per measured pass")

class PredictorError(ValueError):
    """A predictor that cannot be trained, used, read or trusted on this device."""


class PredictorNotFoundError(PredictorError, FileNotFoundError):
    """A predictor file that does not exist."""


class PredictorVersionError(PredictorError):
    """A predictor file written in another format version; ``found`` is the version the file states."""

    def __init__(self, message: str, found: Any) -> None:
        super().__init__(message)
        self.found = found


@dataclass(frozen=True)
class XGBParams:
    """Hyperparameters of one XGBoost regressor (names as in XGBoost's ``train`` parameters)."""

    n_estimators: int = 400
    max_depth: int = 6
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    # One thread: on the few hundred rows a predictor trains on, more threads mostly wait on each other.
    nthread: int = 1

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> XGBParams:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise PredictorError(f"Unknown keys {unknown} in {where}; allowed keys are {names}.")
        return cls(**dict(data))

    def train(self, x: np.ndarray, y: np.ndarray, names: Sequence[str], seed: int) -> xgb.Booster:
        params = {
            "objective": "reg:squarederror",
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "lambda": self.reg_lambda,
            "seed": seed,
            "nthread": self.nthread,
            "verbosity": 0,
        }
        matrix = xgb.DMatrix(x, label=y, feature_names=list(names))
        return xgb.train(params, matrix, num_boost_round=self.n_estimators)


# The scale model learns from one mean |residual| per training subnet (90 with the default
# predictor config), so it is additive (depth-1 trees), and each leaf needs at least 5 subnets.
DEFAULT_SCALE_PARAMS = XGBParams(n_estimators=100, max_depth=1, min_child_weight=5.0)


@dataclass
class Prediction:
    """Predicted latencies in ms, one entry per architecture.

    ``low_ms <= mean_ms <= high_ms`` is true elementwise, and ``[low_ms, high_ms]`` is the nominal
    interval (90% by default) of a new measurement under the predictor's protocol. Its width in
    log space differs between architectures (see :mod:`predictors.conformal`).
    """

    mean_ms: np.ndarray
    low_ms: np.ndarray
    high_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.mean_ms)

    @property
    def relative_width(self) -> np.ndarray:
        """Interval width as a share of the predicted latency, ``(high_ms - low_ms) / mean_ms``."""
        return (self.high_ms - self.low_ms) / self.mean_ms


def _term_column(frame: pd.DataFrame, term: str) -> np.ndarray:
    """Return the column of a base term: a feature name, or a product of names joined by ``*``."""
    column = np.ones(len(frame))
    for name in term.split("*"):
        if name not in frame.columns:
            raise PredictorError(f"Base term {term!r} needs feature {name!r}, which the features lack.")
        column = column * frame[name].to_numpy(dtype=np.float64)
    return column


@dataclass
class _LinearBase:
    """Non-negative linear model ``ms = intercept + sum(coef * term)``, fitted on relative error.

    The fit minimises sum(((prediction - y) / y) ** 2) with non-negative coefficients, so small and
    large subnets weigh the same and every term adds time. Predictions are floored at
    ``floor_ms`` (5% of the smallest training latency) so that log ratios stay finite.
    """

    terms: list[str]
    coef: np.ndarray
    intercept: float
    floor_ms: float

    @classmethod
    def fit(cls, frame: pd.DataFrame, terms: list[str], y_ms: np.ndarray) -> _LinearBase:
        x = np.column_stack([_term_column(frame, term) for term in terms] + [np.ones(len(frame))])
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        solution, _ = nnls(x / scale / y_ms[:, None], np.ones(len(y_ms)))
        solution = solution / scale
        return cls(terms, solution[:-1], float(solution[-1]), float(np.min(y_ms)) * 0.05)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        x = np.column_stack([_term_column(frame, term) for term in self.terms]) if self.terms else np.zeros((len(frame), 0))
        return np.maximum(x @ self.coef + self.intercept, self.floor_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"terms": self.terms, "coef": [float(c) for c in self.coef], "intercept": self.intercept, "floor_ms": self.floor_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _LinearBase:
        coef = np.asarray(data["coef"], dtype=np.float64)
        return cls(list(data["terms"]), coef, float(data["intercept"]), float(data["floor_ms"]))


def _layer_base_terms(hw: HardwareFacts) -> list[str]:
    """Per operator group: SIMD-padded MACs (CPU) or wave-quantised work (GPU), bytes moved and a constant."""
    work = ["cpu_padded_macs"] if hw.device == "cpu" else ["gpu_wave_k_128x64", "gpu_eltwise_waves"]
    return [f"is_{group}*{name}" for group in OP_GROUPS for name in [*work, "bytes_total"]] + [f"is_{g}" for g in OP_GROUPS]


def _group_by_key(records: Iterable[Mapping[str, Any]], field: str) -> tuple[list[Any], list[np.ndarray]]:
    """Group measurement records by ``key``; return each group's ``field`` value and its latencies in ms."""
    groups: dict[str, list[float]] = {}
    values: dict[str, Any] = {}
    for record in records:
        key = record.get("key") or json.dumps(record[field], sort_keys=True)
        groups.setdefault(key, []).append(float(record["latency_ms"]))
        values.setdefault(key, record[field])
    keys = sorted(groups)
    return [values[k] for k in keys], [np.asarray(groups[k]) for k in keys]


def _check_positive(latencies: np.ndarray, what: str) -> None:
    if len(latencies) and (not np.all(np.isfinite(latencies)) or np.min(latencies) <= 0):
        raise PredictorError(f"{what} latencies must be positive and finite, but the minimum is {np.min(latencies)!r}.")


class LatencyPredictor:
    """Predicts whole-network latency in ms with intervals, from each architecture's layer list.

    Call order: construct, :meth:`fit` (or :meth:`load`), then :meth:`predict` any number of
    times. Layer features and per-layer latencies are cached per distinct :class:`LayerSpec`, so
    a search that revisits the same layers pays for each one once. Not thread-safe.

    Args:
        layer_params: hyperparameters of the layer model.
        network_params: hyperparameters of the network model.
        interval: nominal coverage of ``[low_ms, high_ms]``, in (0, 1).
        conformal_folds: folds of the out-of-fold residuals behind the intervals.
        seed: seed of the XGBoost models and of the fold assignment.
        metadata: stored with the model: ``fingerprint`` (device fingerprint dict),
            ``protocol`` (measurement protocol dict), ``space`` and ``space_hash``, and training facts.
        scale_params: hyperparameters of the scale model that sets each interval's width
            (see :mod:`predictors.conformal`).
    """

    format_version = 4
    interval_method = INTERVAL_METHOD

    def __init__(
        self,
        layer_params: XGBParams | None = None,
        network_params: XGBParams | None = None,
        interval: float = 0.9,
        conformal_folds: int = 5,
        seed: int = 0,
        metadata: Mapping[str, Any] | None = None,
        scale_params: XGBParams | None = None,
    ) -> None:
        if not 0.0 < interval < 1.0:
            raise PredictorError(f"interval must be in (0, 1), for example 0.9, but got {interval}.")
        if conformal_folds < 2:
            raise PredictorError(f"conformal_folds must be >= 2, but got {conformal_folds}.")
        self.layer_params = layer_params or XGBParams()
        self.network_params = network_params or XGBParams(n_estimators=300, max_depth=3)
        self.scale_params = scale_params or DEFAULT_SCALE_PARAMS
        self.interval = interval
        self.conformal_folds = conformal_folds
        self.seed = seed
        unknown = sorted(set(metadata or {}) - set(METADATA_KEYS))
        if unknown:
            raise PredictorError(f"Unknown predictor metadata keys {unknown}; allowed keys are {list(METADATA_KEYS)}.")
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.hw: HardwareFacts | None = None
        self.batch_size: int | None = None
        self.lut: dict[LayerSpec, float] = {}
        self.layer_model: xgb.Booster | None = None
        self.layer_base: _LinearBase | None = None
        self.network_model: xgb.Booster | None = None
        self.base: _LinearBase | None = None
        self.scale_model: ScaleModel | None = None
        # Lower and upper quantiles of the normalized scores (log residual / scale).
        self.score_bounds = (0.0, 0.0)
        self.layer_feature_names: list[str] = []
        self.network_feature_names: list[str] = []
        self._featurizer: NetworkFeaturizer | None = None

    # -- training ------------------------------------------------------------------------------
    def fit(
        self,
        layer_records: Iterable[Mapping[str, Any]],
        subnet_records: Iterable[Mapping[str, Any]],
        hw_facts: HardwareFacts,
        batch_size: int | None = None,
    ) -> LatencyPredictor:
        """Train on profile-store records measured on one device at one batch size.

        Args:
            layer_records: records with ``layer`` (a LayerSpec dict) and ``latency_ms``; repeated
                keys (several passes) are reduced to their median. May be empty: then the network
                model works from layer features alone (the external-measurements path).
            subnet_records: records with ``layers`` (LayerSpec dicts) and ``latency_ms``, grouped
                by ``key`` like the layers.
            hw_facts: the device facts the features use.
            batch_size: images per forward pass; defaults to ``metadata["protocol"]["batch_size"]``.
        """
        self.hw = hw_facts
        self.batch_size = self._resolve_batch_size(batch_size)
        layer_dicts, layer_groups = _group_by_key(layer_records, "layer")
        layer_ms = np.array([np.median(group) for group in layer_groups])
        _check_positive(layer_ms, "Layer")
        self.lut = {LayerSpec.from_dict(d): float(ms) for d, ms in zip(layer_dicts, layer_ms)}
        self.layer_feature_names = layer_feature_names(hw_facts)
        self.network_feature_names = network_feature_names(hw_facts, with_latency_sums=bool(self.lut))
        if self.lut:
            self.layer_base, self.layer_model = self._fit_layer_model(list(self.lut), layer_ms)

        subnet_layers, subnet_groups = _group_by_key(subnet_records, "layers")
        subnet_ms = np.array([np.median(group) for group in subnet_groups])
        _check_positive(np.concatenate(subnet_groups) if subnet_groups else subnet_ms, "Subnet")
        if len(subnet_ms) < MIN_TRAIN_SUBNETS:
            raise PredictorError(
                f"Training needs at least {MIN_TRAIN_SUBNETS} measured subnets, but got {len(subnet_ms)}; "
                "raise predictor.n_subnets or lower predictor.holdout_fraction."
            )
        self._featurizer = None
        frame = self.network_features([[LayerSpec.from_dict(d) for d in layers] for layers in subnet_layers])
        self._calibrate_intervals(frame, subnet_ms, subnet_groups)
        self.base, self.network_model = self._fit_network(frame, subnet_ms, self.seed)
        self.metadata.setdefault("training", {}).update(
            {"n_layers": len(self.lut), "n_subnets": int(len(subnet_ms)), "interval_method": INTERVAL_METHOD,
             "score_bounds": list(self.score_bounds)}
        )
        width = self.predict_features(frame).relative_width
        logger.info(
            "Trained latency predictor on %d layer shapes (every shape profiled at this batch size, any space) and "
            "%d subnets. Its %.0f%% intervals (%s) span %.1f%% to %.1f%% of the latency on the training subnets "
            "(median %.1f%%).",
            len(self.lut), len(subnet_ms), 100 * self.interval, INTERVAL_METHOD,
            100 * width.min(), 100 * width.max(), 100 * np.median(width),
        )
        return self

    def _resolve_batch_size(self, batch_size: int | None) -> int:
        if batch_size is None:
            batch_size = (self.metadata.get("protocol") or {}).get("batch_size")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PredictorError(f"fit needs batch_size >= 1 (argument or metadata['protocol']), but got {batch_size!r}.")
        return batch_size

    def _fit_layer_model(self, layers: list[LayerSpec], latency_ms: np.ndarray) -> tuple[_LinearBase, xgb.Booster]:
        assert self.hw is not None
        frame = self._layer_frame(layers)
        base = _LinearBase.fit(frame, _layer_base_terms(self.hw), latency_ms)
        target = np.log(latency_ms) - np.log(base.predict(frame))
        x = frame_to_matrix(frame, self.layer_feature_names)
        return base, self.layer_params.train(x, target, self.layer_feature_names, self.seed)

    def _network_base_terms(self) -> list[str]:
        """With measured layers: the LUT sum and the layer count; else every per-group summed feature."""
        if self.lut:
            return ["lut_sum_ms", "total_layers"]
        prefixes = tuple(f"{group}_" for group in OP_GROUPS)
        return [name for name in self.network_feature_names if name.startswith(prefixes)]

    def _fit_network(self, frame: pd.DataFrame, y_ms: np.ndarray, seed: int) -> tuple[_LinearBase, xgb.Booster]:
        base = _LinearBase.fit(frame, self._network_base_terms(), y_ms)
        target = np.log(y_ms) - np.log(base.predict(frame))
        x = frame_to_matrix(frame, self.network_feature_names)
        return base, self.network_params.train(x, target, self.network_feature_names, seed)

    def _calibrate_intervals(self, frame: pd.DataFrame, y_ms: np.ndarray, passes: list[np.ndarray]) -> None:
        """Set :attr:`scale_model` and :attr:`score_bounds` from out-of-fold predictions, one residual per pass.

        Models train on each subnet's median over passes, but residuals use every pass, so the
        interval covers one new measurement rather than a median of several.
        """
        rng = np.random.default_rng(self.seed)
        folds = rng.permutation(len(y_ms)) % self.conformal_folds
        predicted = np.empty(len(y_ms))
        correction = np.empty(len(y_ms))
        for fold in range(self.conformal_folds):
            test = folds == fold
            base, model = self._fit_network(frame[~test].reset_index(drop=True), y_ms[~test], self.seed + fold + 1)
            predicted[test], correction[test], _ = self._combine(base, model, frame[test].reset_index(drop=True))
        residuals = [np.log(group) - math.log(p) for group, p in zip(passes, predicted)]
        x = frame_to_matrix(frame, self.network_feature_names)
        self.scale_model, self.score_bounds = fit_normalized_conformal(
            x, correction, residuals, folds, self.interval, self.network_feature_names, self.scale_params.train, self.seed
        )

    # -- prediction ----------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.network_model is None or self.base is None or self.scale_model is None or self.hw is None or self.batch_size is None:
            raise PredictorError("LatencyPredictor is not trained: call fit(...) or LatencyPredictor.load(path) first.")

    def _layer_frame(self, layers: Sequence[LayerSpec]) -> pd.DataFrame:
        assert self.hw is not None and self.batch_size is not None
        return pd.DataFrame([layer_features(layer, self.batch_size, self.hw) for layer in layers])

    def predict_layers(self, layers: Sequence[LayerSpec], use_lut: bool = True) -> np.ndarray:
        """Return each layer's latency in ms: the measured one if ``use_lut`` and known, else the layer model's."""
        if self.hw is None or self.batch_size is None:
            raise PredictorError("LatencyPredictor is not trained: call fit(...) or LatencyPredictor.load(path) first.")
        if self.layer_model is None or self.layer_base is None:
            raise PredictorError("This predictor has no layer model because it was trained without layer measurements.")
        if not layers:
            return np.zeros(0)
        frame = self._layer_frame(layers)
        x = frame_to_matrix(frame, self.layer_feature_names)
        predicted = self.layer_base.predict(frame) * np.exp(self.layer_model.inplace_predict(x))
        if use_lut:
            measured = np.array([self.lut.get(layer, np.nan) for layer in layers])
            predicted = np.where(np.isnan(measured), predicted, measured)
        return predicted

    def _layer_columns(self, layers: list[LayerSpec]) -> dict[str, np.ndarray]:
        modelled = self.predict_layers(layers, use_lut=False)
        measured = np.array([self.lut.get(layer, np.nan) for layer in layers])
        return {
            "layer_model_sum_ms": modelled,
            "lut_sum_ms": np.where(np.isnan(measured), modelled, measured),
            "lut_measured": (~np.isnan(measured)).astype(np.float64),
        }

    def network_features(self, layer_lists: Sequence[Sequence[LayerSpec]]) -> pd.DataFrame:
        """Compute the network features (columns :attr:`network_feature_names`) of a batch."""
        if self.hw is None or self.batch_size is None:
            raise PredictorError("LatencyPredictor is not trained: call fit(...) or LatencyPredictor.load(path) first.")
        if self._featurizer is None:
            columns = self._layer_columns if self.lut else None
            self._featurizer = NetworkFeaturizer(self.batch_size, self.hw, columns)
        return self._featurizer.features(layer_lists)

    def _combine(self, base: _LinearBase, model: xgb.Booster, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the latency in ms, the model's log correction of the linear base and the feature matrix."""
        x = frame_to_matrix(frame, self.network_feature_names)
        correction = np.asarray(model.inplace_predict(x), dtype=np.float64)
        return base.predict(frame) * np.exp(correction), correction, x

    def predict_features(self, frame: pd.DataFrame) -> Prediction:
        """Predict from a network feature frame; its column order does not matter."""
        self._require_fitted()
        assert self.base is not None and self.network_model is not None
        assert self.scale_model is not None
        mean, correction, x = self._combine(self.base, self.network_model, frame)
        scale = self.scale_model.predict(x, correction)
        low, high = self.score_bounds
        return Prediction(mean_ms=mean, low_ms=mean * np.exp(min(low, 0.0) * scale), high_ms=mean * np.exp(max(high, 0.0) * scale))

    def predict(self, layer_lists: Sequence[Sequence[LayerSpec]]) -> Prediction:
        """Predict the latency of each architecture, given its layers in execution order."""
        self._require_fitted()
        if len(layer_lists) == 0:
            empty = np.zeros(0)
            return Prediction(empty, empty.copy(), empty.copy())
        return self.predict_features(self.network_features(layer_lists))

    # -- persistence ---------------------------------------------------------------------------
    def to_document(self) -> dict[str, Any]:
        """Return the JSON-ready fields that :meth:`save` writes after ``kind`` and ``format_version``."""
        self._require_fitted()
        assert self.hw is not None and self.base is not None and self.network_model is not None
        assert self.scale_model is not None
        return {
            "hardware": self.hw.to_dict(),
            "batch_size": self.batch_size,
            "interval": self.interval,
            "conformal_folds": self.conformal_folds,
            "seed": self.seed,
            "interval_method": INTERVAL_METHOD,
            "score_bounds": list(self.score_bounds),
            "scale_model": self.scale_model.to_dict(),
            "layer_params": dataclasses.asdict(self.layer_params),
            "network_params": dataclasses.asdict(self.network_params),
            "scale_params": dataclasses.asdict(self.scale_params),
            "layer_feature_names": self.layer_feature_names,
            "network_feature_names": self.network_feature_names,
            "base": self.base.to_dict(),
            "lut": [{"layer": layer.to_dict(), "latency_ms": ms} for layer, ms in self.lut.items()],
            "layer_base": None if self.layer_base is None else self.layer_base.to_dict(),
            "layer_model": None if self.layer_model is None else bytes(self.layer_model.save_raw("json")).decode(),
            "network_model": bytes(self.network_model.save_raw("json")).decode(),
            **{key: self.metadata.get(key) for key in METADATA_KEYS},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the predictor to ``path`` as one JSON file, atomically (temporary file, then rename)."""
        document = {"kind": DOCUMENT_KIND, "format_version": self.format_version, **self.to_document()}
        target = Path(path)
        write_json_atomic(target, document, sync=True, separators=(",", ":"))
        logger.info("Saved latency predictor to %s.", target)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], fingerprint: Mapping[str, Any] | None = None, allow_mismatch: bool = False
    ) -> LatencyPredictor:
        """Read a predictor written by :meth:`save`.

        Args:
            path: the JSON file.
            fingerprint: the current device fingerprint. When given, it must match the stored one,
                unless ``allow_mismatch`` is true; then a warning names the differing fields.

        Raises:
            PredictorNotFoundError: ``path`` does not exist.
            PredictorError: the file is not valid JSON, has another format version or fields are
                missing, or the fingerprint differs and ``allow_mismatch`` is false.
        """
        doc = _read_document(Path(path), cls.format_version)
        if fingerprint is not None:
            _check_fingerprint(Path(path), doc.get("fingerprint"), fingerprint, allow_mismatch)
        try:
            return cls._from_document(doc)
        except (KeyError, TypeError, ValueError, xgb.core.XGBoostError) as err:
            raise PredictorError(f"Predictor file {path} is incomplete or corrupt ({err!r}); {REBUILD_HINT}.") from err

    @classmethod
    def _from_document(cls, doc: Mapping[str, Any]) -> LatencyPredictor:
        metadata = {key: doc[key] for key in METADATA_KEYS if doc.get(key) is not None}
        predictor = cls(
            XGBParams(**doc["layer_params"]),
            XGBParams(**doc["network_params"]),
            float(doc["interval"]),
            int(doc["conformal_folds"]),
            int(doc["seed"]),
            metadata,
            XGBParams(**doc["scale_params"]),
        )
        predictor.hw = HardwareFacts.from_dict(doc["hardware"])
        predictor.batch_size = int(doc["batch_size"])
        predictor.score_bounds = (float(doc["score_bounds"][0]), float(doc["score_bounds"][1]))
        predictor.scale_model = ScaleModel.from_dict(doc["scale_model"])
        predictor.layer_feature_names = list(doc["layer_feature_names"])
        predictor.network_feature_names = list(doc["network_feature_names"])
        if predictor.scale_model.feature_names[:-1] != predictor.network_feature_names:
            raise ValueError("the scale model's features differ from the network features")
        predictor.base = _LinearBase.from_dict(doc["base"])
        predictor.lut = {LayerSpec.from_dict(row["layer"]): float(row["latency_ms"]) for row in doc["lut"]}
        predictor.layer_model = _booster_from_json(doc["layer_model"]) if doc["layer_model"] is not None else None
        predictor.layer_base = _LinearBase.from_dict(doc["layer_base"]) if doc["layer_base"] is not None else None
        predictor.network_model = _booster_from_json(doc["network_model"])
        return predictor


def _booster_from_json(text: str) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(bytearray(text.encode()))
    return booster


def _read_document(path: Path, format_version: int) -> dict[str, Any]:
    if not path.is_file():
        raise PredictorNotFoundError(
            f"Predictor file {path} not found; set predictor.path to an existing file, or leave it null to build one."
        )
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PredictorError(f"Predictor file {path} is not valid JSON ({err}); {REBUILD_HINT}.") from err
    if not isinstance(doc, dict) or doc.get("kind") != DOCUMENT_KIND:
        raise PredictorError(f"{path} is not a TailNAS latency predictor (kind != {DOCUMENT_KIND!r}); {REBUILD_HINT}.")
    if doc.get("format_version") != format_version:
        raise PredictorVersionError(
            f"Predictor file {path} has format_version {doc.get('format_version')!r}, but this TailNAS reads "
            f"version {format_version} ({FORMAT_CHANGE}); {REBUILD_HINT}.",
            doc.get("format_version"),
        )
    return doc


def _check_fingerprint(path: Path, stored: Any, current: Mapping[str, Any], allow_mismatch: bool) -> None:
    from predictors.fingerprint import fingerprints_match

    if not isinstance(stored, Mapping):
        raise PredictorError(f"Predictor file {path} has no device fingerprint; {REBUILD_HINT}.")
    match, differing = fingerprints_match(stored, current)
    if match:
        return
    message = (
        f"Predictor file {path} was built on another device: fingerprint fields {sorted(differing)} differ "
        f"(stored fingerprint {fingerprint_summary(stored, differing)}, this device {fingerprint_summary(current, differing)})."
    )
    if allow_mismatch:
        logger.warning("%s Using it anyway because predictor.allow_fingerprint_mismatch=true.", message)
        return
    raise PredictorError(
        f"{message} Build one on this device ({REBUILD_HINT}), or set predictor.allow_fingerprint_mismatch=true "
        "to use it anyway."
    )


def fingerprint_summary(fingerprint: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Return the values of ``fields`` in ``fingerprint``, for error messages."""
    return {field: fingerprint.get(field) for field in sorted(fields)}

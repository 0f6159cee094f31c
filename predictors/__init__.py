"""Latency measurement and prediction: profiling, the profile store, the latency predictor and gated-block latency."""

from predictors.fingerprint import device_fingerprint, fingerprint_id, fingerprints_match, simd_width_floats
from predictors.modules import build_layer_module, fold_batchnorm, layer_input_shape
from predictors.profiler_records import ProfilingError
from predictors.profiling import (
    Measurement,
    ProfileSummary,
    enumerate_layers,
    measure_arch,
    measure_module,
    profile_space,
    width_sweep,
)
from predictors.protocol import MeasurementProtocol
from predictors.store import STORE_FORMAT_VERSION, ProfileStore, StoreError

__all__ = [
    "STORE_FORMAT_VERSION",
    "Measurement",
    "MeasurementProtocol",
    "ProfileStore",
    "ProfileSummary",
    "ProfilingError",
    "StoreError",
    "build_layer_module",
    "device_fingerprint",
    "enumerate_layers",
    "fingerprint_id",
    "fingerprints_match",
    "fold_batchnorm",
    "layer_input_shape",
    "measure_arch",
    "measure_module",
    "profile_space",
    "simd_width_floats",
    "width_sweep",
]

# Features, the XGBoost predictor and tail-aware widths. predictors.build, predictors.external and
# predictors.evaluate are imported from their modules, because predictors.evaluate is also run as
# `python -m predictors.evaluate` and must not be imported before that runs.
from predictors.features import HardwareFacts, NetworkFeaturizer, layer_features, network_contributions  # noqa: E402
from predictors.gated import GatedBlockLatency, GatedLatencyError, fit_for_model, profile_gated_blocks  # noqa: E402
from predictors.tail_aware import tail_aware_widths  # noqa: E402
from predictors.xgb import LatencyPredictor, Prediction, PredictorError  # noqa: E402

__all__ += [
    "GatedBlockLatency",
    "GatedLatencyError",
    "HardwareFacts",
    "LatencyPredictor",
    "NetworkFeaturizer",
    "Prediction",
    "PredictorError",
    "fit_for_model",
    "layer_features",
    "network_contributions",
    "profile_gated_blocks",
    "tail_aware_widths",
]

"""Normalized split-conformal intervals: a nominal-coverage interval whose width follows a scale model.

The latency predictor works in log space. For a training subnet ``i`` with out-of-fold prediction
``log_pred_i`` and measured passes ``y_ij``, the out-of-fold residuals are ``r_ij = log(y_ij) -
log_pred_i``. A scale model ``s(x)`` estimates the mean ``|r|`` of an architecture from its network
features and the size of the network model's correction. The conformal scores are ``r_ij / s(x_i)``,
with ``s`` itself out-of-fold. Their lower and upper split-conformal quantiles ``q_low <= 0 <=
q_high`` give the interval ``[pred * exp(q_low * s(x)), pred * exp(q_high * s(x))]`` of a new
architecture, so an architecture whose residuals the scale model expects to be twice the typical
size gets an interval twice as wide in log space. Lei, G'Sell, Rinaldo, Tibshirani and Wasserman,
"Distribution-free predictive inference for regression" (arXiv:1604.04173), describe this
extension of split conformal to bands of locally varying width.

The scores come from cross-validation folds rather than from a separate calibration split, so
that every training subnet serves both the models and the calibration. Coverage is therefore near
the nominal level, not guaranteed to reach it.

The passes of one subnet share its prediction error, so they are not independent scores. The
quantiles therefore pool the subnets' score distributions with equal weight per subnet (each pass
of a subnet with ``m`` passes weighs ``1 / m``), and the finite-sample correction counts subnets,
not passes. Dunn, Wasserman and Ramdas, "Distribution-free prediction sets for two-layer
hierarchical models" (arXiv:1809.07441), call this CDF pooling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgboost as xgb

__all__ = ["INTERVAL_METHOD", "SCALE_FLOOR_SHARE", "ScaleModel", "conformal_bounds", "fit_normalized_conformal"]

logger = logging.getLogger(__name__)

INTERVAL_METHOD = "normalized split conformal"
# The scale is floored at this share of the mean training |residual|, so that no score divides by
# a near-zero scale and no interval is narrower than a quarter of the typical one.
SCALE_FLOOR_SHARE = 0.25
# Name of the scale model's extra input: |log(predicted / linear base)| of the network model.
CORRECTION_FEATURE = "abs_log_correction"

# Trains one regressor: (inputs, targets, feature names, seed) -> booster.
TrainFn = Callable[[np.ndarray, np.ndarray, Sequence[str], int], xgb.Booster]


def conformal_bounds(scores: Sequence[np.ndarray], level: float) -> tuple[float, float]:
    """Return the lower and upper split-conformal quantiles of a ``level`` interval.

    ``scores`` holds one array per calibration subnet, one score per measured pass. Each tail gets
    (1 - level) / 2. With ``n`` subnets, each subnet weighs ``1 / (n + 1)``, shared equally by its
    passes, and the remaining ``1 / (n + 1)`` stands for the new subnet. The upper bound is the
    smallest score whose cumulative weight reaches ``1 - tail``, clipped to the largest score; the
    lower bound mirrors it. With one pass per subnet these are the ranks ``floor((n + 1) * tail)``
    and ``ceil((n + 1) * (1 - tail))`` of plain split conformal.
    """
    groups = [np.asarray(group, dtype=np.float64).ravel() for group in scores]
    groups = [group for group in groups if group.size]
    n = len(groups)
    if n == 0:
        raise ValueError("conformal_bounds needs at least one calibration subnet with a score.")
    tail = (1.0 - level) / 2.0
    values = np.concatenate(groups)
    weights = np.concatenate([np.full(group.size, 1.0 / (group.size * (n + 1))) for group in groups])
    # All subnets together weigh n / (n + 1). Below 1 - tail, the interval spans every score.
    if n / (n + 1) < 1.0 - tail - 1e-12:
        logger.warning("%d calibration subnets are too few for a %g%% interval: it spans all their scores and can "
                       "cover less than %g%% of new subnets. Profile more subnets (predictor.n_subnets).", n,
                       100 * level, 100 * level)
    return -_weighted_upper(-values, weights, 1.0 - tail), _weighted_upper(values, weights, 1.0 - tail)


def _weighted_upper(values: np.ndarray, weights: np.ndarray, target: float) -> float:
    """Return the smallest value whose cumulative weight reaches ``target``, else the largest value."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, target - 1e-12, side="left"))
    return float(values[order][min(index, len(values) - 1)])


@dataclass
class ScaleModel:
    """An XGBoost model of the mean |log residual| of an architecture, floored at ``floor``.

    Inputs are the network features (in ``feature_names`` order, without the last name) and
    :data:`CORRECTION_FEATURE`, the absolute log correction that the network model applied.
    """

    booster: xgb.Booster
    floor: float
    feature_names: list[str]

    @classmethod
    def fit(
        cls, x: np.ndarray, correction: np.ndarray, abs_residual: np.ndarray, names: Sequence[str], floor: float,
        train: TrainFn, seed: int,
    ) -> ScaleModel:
        feature_names = [*names, CORRECTION_FEATURE]
        booster = train(_scale_inputs(x, correction), abs_residual, feature_names, seed)
        return cls(booster, floor, feature_names)

    def predict(self, x: np.ndarray, correction: np.ndarray) -> np.ndarray:
        """Return the scale of each row of ``x``, in log-latency units, at least ``floor``."""
        raw = self.booster.inplace_predict(_scale_inputs(x, correction))
        return np.maximum(np.asarray(raw, dtype=np.float64), self.floor)

    def to_dict(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "feature_names": self.feature_names,
            "model": bytes(self.booster.save_raw("json")).decode(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScaleModel:
        booster = xgb.Booster()
        booster.load_model(bytearray(str(data["model"]).encode()))
        return cls(booster, float(data["floor"]), list(data["feature_names"]))


def _scale_inputs(x: np.ndarray, correction: np.ndarray) -> np.ndarray:
    return np.column_stack([x, np.abs(np.asarray(correction, dtype=np.float64))])


def fit_normalized_conformal(
    x: np.ndarray,
    correction: np.ndarray,
    residuals: Sequence[np.ndarray],
    folds: np.ndarray,
    level: float,
    names: Sequence[str],
    train: TrainFn,
    seed: int,
) -> tuple[ScaleModel, tuple[float, float]]:
    """Fit the scale model and calibrate the normalized conformal scores of a ``level`` interval.

    Args:
        x: network features of the training subnets, one row per subnet, columns ``names``.
        correction: each subnet's out-of-fold log correction of the network model.
        residuals: each subnet's out-of-fold log residuals, one per measured pass.
        folds: each subnet's fold index, the same folds as the out-of-fold predictions.
        level: nominal coverage, in (0, 1).
        names: the network feature names.
        train: trains one scale regressor.
        seed: seed of the scale models.

    Returns:
        The scale model trained on every subnet, and the (lower, upper) score quantiles.
    """
    abs_residual = np.array([np.mean(np.abs(r)) for r in residuals])
    floor = SCALE_FLOOR_SHARE * max(float(np.mean(abs_residual)), 1e-12)

    # Each subnet's scale comes from a model that never saw its residuals, like its predicted
    # latency. An in-sample scale would be too close to the residuals, so scores and coverage shrink.
    scale = np.empty(len(abs_residual))
    for fold in np.unique(folds):
        test = folds == fold
        model = ScaleModel.fit(x[~test], correction[~test], abs_residual[~test], names, floor, train, seed + int(fold) + 1)
        scale[test] = model.predict(x[test], correction[test])

    bounds = conformal_bounds([r / s for r, s in zip(residuals, scale)], level)
    return ScaleModel.fit(x, correction, abs_residual, names, floor, train, seed), bounds

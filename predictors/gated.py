"""Gate-aware latency: profile residual blocks with dynamic gates per kept count, and learn it.

A gated block's latency is not its convolutions' latency scaled by the kept share. The gates' own
pooling, scoring and top-k cost time, gathering weight rows and columns costs time, and the kept
channel count falls on the device's staircase. So the blocks are timed as the runtime runs them
(eval, skip path, BatchNorm folded) at kept counts over the keep-ratio range, and an XGBoost model
learns log latency from the block's shape and the kept counts. ``gates.latency_budget_ms`` then
predicts a gated network as its measured ungated latency plus, per gated block, the predicted
gated latency minus the predicted ungated latency of that block.

Each block is identified by its signature (:func:`block_signature`): the block type, the input
channels and size, and every stage convolution as a ``LayerSpec``. Each measurement is one run
(:func:`block_runs`): a gate option, the kept channels and columns, and whether batches above 1
took the grouped path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from nas.spaces.layers import LayerSpec
from predictors.features import HardwareFacts, layer_features
from predictors.profiling import MeasurementProtocol, measure_module
from predictors.xgb import XGBParams

__all__ = [
    "GatedLatencyError",
    "GatedBlockLatency",
    "PROFILE_RATIOS",
    "block_runs",
    "block_signature",
    "collect_blocks",
    "evaluate_gated_latency",
    "fit_for_model",
    "gated_block_features",
    "holdout_predictions",
    "profile_gated_blocks",
    "run_key",
    "score_holdout",
    "space_blocks",
]

log = logging.getLogger(__name__)

# Keep ratios at which column and channel+column gates are timed. Channel gates are timed at every
# multiple of 8 channels instead, because their counts snap to channel steps.
PROFILE_RATIOS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
# Minimum distinct runs to fit a model on. One block suffices for a budget on a subnet with one
# gated block: the model then interpolates between that block's kept counts.
MIN_RUNS = 5
# Minimum blocks that held-out scoring trains on.
MIN_TRAIN_BLOCKS = 2
DEFAULT_PARAMS = XGBParams(n_estimators=300, max_depth=4, learning_rate=0.1)


class GatedLatencyError(ValueError):
    """Gated-block records that cannot train a model, or a prediction request the model cannot serve."""


# -- blocks and runs -----------------------------------------------------------------------------


def block_signature(block: nn.Module, site: Any) -> dict[str, Any]:
    """Return the JSON signature of an ungated ``block`` at ``site`` (a ``nas.gates.BlockSite``).

    Contains ``type`` (class name), ``in_channels``, ``in_size``, ``stages`` (a ``LayerSpec`` dict per
    stage convolution in order), ``producer`` (index of the stage whose output is gated),
    ``shortcut`` (a convolution on the residual path) and ``squeeze_excite``.
    """
    from nas.gates.blocks import block_layout
    from nas.gates.planning import activation_name, conv_spec

    layout = block_layout(block)
    if layout is None:
        raise GatedLatencyError(f"{type(block).__name__} at {site.name} is not a gateable block type.")
    stages = []
    size = site.in_size
    for conv_name, _, act_name in layout.stages:
        act = activation_name(getattr(block, act_name)) if act_name is not None else "none"
        spec = conv_spec(getattr(block, conv_name), size, act)
        stages.append(spec.to_dict())
        size = spec.out_size
    downsample = getattr(block, "downsample", None)
    return {
        "type": type(block).__name__,
        "in_channels": int(site.in_channels),
        "in_size": int(site.in_size),
        "stages": stages,
        "producer": int(layout.producer),
        "shortcut": any(isinstance(m, nn.Conv2d) for m in downsample.modules()) if downsample is not None else False,
        "squeeze_excite": layout.squeeze_excite is not None and getattr(block, layout.squeeze_excite, None) is not None,
    }


def _stage_specs(block: Mapping[str, Any]) -> list[LayerSpec]:
    return [LayerSpec.from_dict(dict(stage)) for stage in block["stages"]]


def inner_shape(block: Mapping[str, Any]) -> tuple[int, int]:
    """Return (channels, columns) of the gated inner map of a block signature."""
    stages = _stage_specs(block)
    return stages[block["producer"]].out_channels, stages[-1].in_size


def run_key(block: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """Return the store key of one run of one block."""
    return json.dumps({"block": block, "run": run}, sort_keys=True, separators=(",", ":"))


def _none_run(block: Mapping[str, Any]) -> dict[str, Any]:
    channels, columns = inner_shape(block)
    return {"option": "none", "channels": channels, "columns": columns, "grouped": False}


def block_runs(block: Mapping[str, Any], batch_size: int, channel: bool = True, column: bool = True,
               grouped: bool = False, ratios: Sequence[float] = PROFILE_RATIOS) -> list[dict[str, Any]]:
    """Return the runs that profile one block: the ungated block, then each gate option per kept count.

    Channel gates keep every count of ``default_channel_steps`` below the inner channels (the
    multiples of 8). Column gates keep ``ceil(r * columns)`` for ``r`` in ``ratios``, and
    channel+column gates pair that with ``ceil(r * channels)`` rounded up to those steps. Counts
    that keep everything are left out. With ``grouped`` and a batch above 1, channel gates are also
    timed on the grouped path.
    """
    from nas.gates.modules import keep_count
    from nas.gates.planning import default_channel_steps, snap_up

    inner, columns = inner_shape(block)
    steps = default_channel_steps(inner)
    runs = [_none_run(block)]
    if channel:
        for count in steps[:-1]:
            runs.append({"option": "channel", "channels": count, "columns": columns, "grouped": False})
            if grouped and batch_size > 1:
                runs.append({"option": "channel", "channels": count, "columns": columns, "grouped": True})
    column_counts = sorted({keep_count(r, columns) for r in ratios} - {columns})
    if column:
        runs += [{"option": "column", "channels": inner, "columns": c, "grouped": False} for c in column_counts]
    if channel and column:
        pairs = set()
        for r in ratios:
            pairs.add((snap_up(steps, keep_count(r, inner), inner), keep_count(r, columns)))
        runs += [{"option": "channel+column", "channels": c, "columns": k, "grouped": False}
                 for c, k in sorted(pairs) if c < inner and k < columns]
    return runs


def collect_blocks(models: Iterable[tuple[nn.Module, Sequence[int]]],
                   names: Collection[str] | None = None) -> list[tuple[nn.Module, Any, dict[str, Any]]]:
    """Return (block, site, signature) for each distinct gateable block of ``models`` ((model, input shape) pairs).

    With ``names``, only the blocks at those module paths count.
    """
    from nas.gates.planning import find_block_sites

    found: dict[str, tuple[nn.Module, Any, dict[str, Any]]] = {}
    for model, shape in models:
        for site in find_block_sites(model, shape):
            if names is not None and site.name not in names:
                continue
            block = model.get_submodule(site.name)
            signature = block_signature(block, site)
            found.setdefault(json.dumps(signature, sort_keys=True), (block, site, signature))
    return list(found.values())


def space_blocks(space: Any, n_subnets: int, seed: int) -> list[tuple[nn.Module, Any, dict[str, Any]]]:
    """Return the distinct gateable blocks of ``n_subnets`` subnets of ``space`` (random weights)."""
    from predictors.profiling import sample_subnets

    archs = sample_subnets(space, n_subnets, seed)
    if not archs:
        return []
    with torch.random.fork_rng(devices=[]):
        supernet = space.build_supernet()
    return collect_blocks((supernet.extract(arch).eval(), space.input_shape(arch)) for arch in archs)


def _run_module(block: nn.Module, site: Any, run: Mapping[str, Any], config: Any) -> nn.Module:
    """Return a folded eval copy of ``block`` that runs ``run``'s gate option at its kept counts."""
    from nas.gates.timing import option_module

    # Batches above 1 off the grouped path are timed masked (skip_max_share 0), the slowest path the
    # runtime takes, because an untrained gate's selections do not predict a trained one's union.
    return option_module(block, site, run["option"], config, [],
                         skip_max_share=0.0, channels=int(run["channels"]), grouped=bool(run["grouped"]),
                         columns=int(run["columns"]))


def profile_gated_blocks(blocks: Sequence[tuple[nn.Module, Any, dict[str, Any]]], store: Any,
                         protocol: MeasurementProtocol, passes: int = 2, seed: int = 0, progress: bool = True,
                         source: str = "profile", channel: bool = True, column: bool = True) -> int:
    """Time every run of ``blocks`` (from :func:`collect_blocks`) ``passes`` times into ``store``.

    Runs already stored for this protocol's batch size are skipped, so an interrupted call
    resumes. The (run, pass) pairs are shuffled with ``seed`` so that a slow minute spreads over
    all blocks. Timing uses the eager runtime without the profiler pass (``record_operators``
    off): a gated block's operators depend on the kept counts and add nothing to the latency.

    Returns:
        The number of measurements taken: one per (run, pass) pair that the store lacked.

    Raises:
        GatedLatencyError: for a runtime other than eager (gates choose their path in Python at run
            time, which an exported or compiled graph would fix) or ``passes`` below 1.
    """
    from nas.gates.blocks import block_layout, gated_block_class
    from nas.gates.config import parse_gate_config

    if protocol.runtime != "eager":
        raise GatedLatencyError(f"Gated blocks are profiled with hardware.runtime=eager, but got {protocol.runtime!r}; "
                                "set hardware.runtime=eager, or profile.gate_subnets=0 and gates.latency_budget_ms=null.")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise GatedLatencyError(f"profile.passes must be a positive integer, but got {passes!r}.")
    done = {(r["key"], int(r["pass"])) for r in store.gated_block_records(protocol.batch_size)}
    pending = []
    for index, (block, site, signature) in enumerate(blocks):
        grouped = gated_block_class(block).supports_channel_path(block_layout(block))
        for run in block_runs(signature, protocol.batch_size, channel, column, grouped):
            key = run_key(signature, run)
            pending += [(index, run, key, p) for p in range(passes) if (key, p) not in done]
    # The kept counts come with each run, so the defaults of conf/gates/feature.yaml serve every run.
    config = parse_gate_config({"name": "feature"})
    order = np.random.default_rng([seed, 2]).permutation(len(pending))
    log.info("Profiling %d distinct gateable block shapes into %s: %d measurements to take.", len(blocks),
             store.directory, len(pending))
    for i in tqdm(order, desc="gated blocks", unit="run", disable=not progress):
        index, run, key, pass_index = pending[i]
        block, site, signature = blocks[index]
        shape = (site.in_channels, site.in_size, site.in_size)
        m = measure_module(_run_module(block, site, run, config), shape, protocol, record_operators=False)
        store.add_gated_block(key, signature, run, m, pass_index, source=source)
    return len(pending)


# -- features and model --------------------------------------------------------------------------


def _kept_stages(block: Mapping[str, Any], channels: int) -> list[LayerSpec]:
    """Return the stage convolutions with ``channels`` inner channels kept."""
    stages = _stage_specs(block)
    producer = block["producer"]
    kept = []
    for index, spec in enumerate(stages):
        if index == producer:
            spec = dataclasses.replace(spec, out_channels=channels)
        elif producer < index < len(stages) - 1:
            groups = channels if spec.groups == spec.in_channels else spec.groups
            spec = dataclasses.replace(spec, in_channels=channels, out_channels=channels, groups=groups)
        elif index == len(stages) - 1:
            spec = dataclasses.replace(spec, in_channels=channels)
        kept.append(spec)
    return kept


def gated_block_features(block: Mapping[str, Any], run: Mapping[str, Any], batch_size: int,
                         hw: HardwareFacts) -> dict[str, float]:
    """Return the features of one run of one block.

    The features are the block's shape (input, inner and output channels and sizes, stride,
    stages), the gate option and kept counts, and the MACs of the stages with and without the kept
    share. From the producer on, the kept columns scale the MACs too. The device features (SIMD
    remainders or GEMM tiles and waves) of the producer and consumer at the kept count follow.
    """
    stages = _stage_specs(block)
    producer = block["producer"]
    inner, columns = inner_shape(block)
    channels, kept_columns = int(run["channels"]), int(run["columns"])
    if not (1 <= channels <= inner and 1 <= kept_columns <= columns):
        raise GatedLatencyError(f"Run {dict(run)} keeps counts outside the block's {inner} channels and {columns} columns.")
    kept = _kept_stages(block, channels)
    column_share = kept_columns / columns
    full_macs = batch_size * sum(s.macs for s in stages)
    kept_macs = batch_size * sum(s.macs * (column_share if i >= producer else 1.0) for i, s in enumerate(kept))
    option = run["option"]
    out: dict[str, float] = {
        "batch_size": batch_size,
        "in_channels": block["in_channels"],
        "in_size": block["in_size"],
        "inner_channels": inner,
        "inner_size": columns,
        "out_channels": stages[-1].out_channels,
        "stride": max(s.stride for s in stages),
        "stages": len(stages),
        "depthwise": float(any(s.groups > 1 and s.groups == s.in_channels for s in stages)),
        "shortcut": float(block["shortcut"]),
        "squeeze_excite": float(block["squeeze_excite"]),
        "channel_gate": float("channel" in option),
        "column_gate": float("column" in option),
        "grouped": float(run["grouped"]),
        "kept_channels": channels,
        "kept_columns": kept_columns,
        "channel_share": channels / inner,
        "column_share": column_share,
        "full_macs": full_macs,
        "log_full_macs": math.log1p(full_macs),
        "kept_macs": kept_macs,
        "log_kept_macs": math.log1p(kept_macs),
        "macs_share": kept_macs / full_macs,
    }
    for prefix, spec in (("producer", kept[producer]), ("consumer", kept[-1])):
        for name, value in layer_features(spec, batch_size, hw).items():
            if name.startswith(("cpu_", "gpu_")) or name in ("macs", "arith_intensity", "gemm_m", "gemm_n", "gemm_k"):
                out[f"{prefix}_{name}"] = value
    return {key: float(value) for key, value in out.items()}


# Terms of the linear part of the model, in log latency. The trees then fit what it leaves: the
# linear part carries the model to block sizes between and beyond the profiled ones.
LINEAR_TERMS = ("log_kept_macs", "log_full_macs", "channel_gate", "column_gate")


def _design(x: np.ndarray, names: Sequence[str]) -> np.ndarray:
    columns = [names.index(term) for term in LINEAR_TERMS]
    return np.column_stack([np.ones(len(x)), x[:, columns]])


def _records_by_key(records: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], np.ndarray, int]:
    """Return one record per key, the median latency over its passes, and the shared batch size."""
    latencies: dict[str, list[float]] = defaultdict(list)
    first: dict[str, Mapping[str, Any]] = {}
    batch_sizes = set()
    for record in records:
        latencies[record["key"]].append(float(record["latency_ms"]))
        first.setdefault(record["key"], record)
        batch_sizes.add(int(record["measurement"]["protocol"]["batch_size"]))
    if len(batch_sizes) > 1:
        raise GatedLatencyError(f"Gated-block records mix batch sizes {sorted(batch_sizes)}; "
                                "pass the records of one batch size (ProfileStore.gated_block_records(batch_size)).")
    keys = sorted(first)  # the fit then does not depend on the order of the store's lines
    y = np.array([float(np.median(latencies[k])) for k in keys])
    return [first[k] for k in keys], y, batch_sizes.pop() if batch_sizes else 0


class GatedBlockLatency:
    """Predict the latency (ms per batch) of gated residual blocks on one device at one batch size.

    Fit it with :meth:`fit` on ``ProfileStore.gated_block_records(batch_size)``. Blocks of shapes
    not in the records are predicted too, so profile the blocks of the subnet at hand for the best
    figures (``train.py`` does that for ``gates.latency_budget_ms``). The model is a least-squares
    fit of log latency on ``LINEAR_TERMS`` plus XGBoost trees on its residual.
    """

    def __init__(self, booster: Any, coef: np.ndarray, names: list[str], hw: HardwareFacts, batch_size: int,
                 blocks: int, runs: int) -> None:
        self.booster = booster
        self.coef = coef
        self.names = names
        self.hw = hw
        self.batch_size = batch_size
        self.blocks = blocks
        self.runs = runs

    @classmethod
    def fit(cls, records: Iterable[Mapping[str, Any]], hw: HardwareFacts, params: XGBParams = DEFAULT_PARAMS,
            seed: int = 0) -> GatedBlockLatency:
        """Fit on gated-block store records of one batch size (passes of one run are merged by median).

        Raises:
            GatedLatencyError: with fewer than 5 distinct runs, mixed batch
                sizes, or a latency that is not positive.
        """
        unique, y, batch_size = _records_by_key(records)
        blocks = len({json.dumps(r["block"], sort_keys=True) for r in unique})
        if len(unique) < MIN_RUNS:
            raise GatedLatencyError(
                f"Gated-block latency needs at least {MIN_RUNS} distinct runs, but the records contain {len(unique)} "
                f"runs of {blocks} blocks; profile blocks with `python -m predictors.profile +space=<space> "
                "profile.gate_subnets=20`."
            )
        if not np.all(y > 0):
            raise GatedLatencyError("Gated-block records contain a latency that is not positive; delete those lines.")
        frame = [gated_block_features(r["block"], r["run"], batch_size, hw) for r in unique]
        names = sorted(frame[0])
        x = np.array([[row[name] for name in names] for row in frame])
        base = _design(x, names)
        coef, *_ = np.linalg.lstsq(base, np.log(y), rcond=None)
        booster = params.train(x, np.log(y) - base @ coef, names, seed)
        return cls(booster, coef, names, hw, batch_size, blocks, len(unique))

    def predict(self, blocks: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Return the predicted latency (ms) of each (block, run) pair."""
        import xgboost as xgb

        if len(blocks) != len(runs):
            raise GatedLatencyError(f"predict got {len(blocks)} blocks but {len(runs)} runs; pass one run per block.")
        if not runs:
            return np.zeros(0)
        rows = [gated_block_features(b, r, self.batch_size, self.hw) for b, r in zip(blocks, runs)]
        x = np.array([[row[name] for name in self.names] for row in rows])
        residual = self.booster.predict(xgb.DMatrix(x, feature_names=self.names))
        return np.exp(_design(x, self.names) @ self.coef + residual)

    def delta_ms(self, blocks: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Return each run's predicted latency minus the same block's predicted ungated latency (ms)."""
        both = self.predict(list(blocks) * 2, list(runs) + [_none_run(b) for b in blocks])
        return both[: len(runs)] - both[len(runs):]


def _metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    relative = np.abs(predicted - measured) / measured
    tau = stats.kendalltau(predicted, measured).statistic if len(measured) > 1 else float("nan")
    return {"within_10pct": float(np.mean(relative <= 0.10)), "within_5pct": float(np.mean(relative <= 0.05)),
            "mape": float(100 * relative.mean()), "kendall_tau": float(tau)}


def holdout_predictions(records: Iterable[Mapping[str, Any]], hw: HardwareFacts, holdout: float = 0.25,
                        seed: int = 0) -> dict[str, Any]:
    """Fit on most blocks and predict every run of the rest, which training never saw.

    Returns ``measured``, ``predicted`` and ``proportional`` latencies (ms arrays, one entry per
    held-out run) with ``blocks_train``, ``blocks_test`` and ``batch_size``. ``proportional``
    scales each held-out block's measured ungated latency by the kept share of its MACs, which is
    the saving a FLOPs count predicts.
    """
    records = list(records)
    unique, y, batch_size = _records_by_key(records)
    signatures = sorted({json.dumps(r["block"], sort_keys=True) for r in unique})
    n_test = max(1, int(round(holdout * len(signatures))))
    if len(signatures) - n_test < MIN_TRAIN_BLOCKS:
        raise GatedLatencyError(f"{len(signatures)} profiled blocks are too few to hold {n_test} out; profile more subnets.")
    test = set(np.random.default_rng(seed).permutation(signatures)[:n_test].tolist())
    model = GatedBlockLatency.fit([r for r in records if json.dumps(r["block"], sort_keys=True) not in test], hw,
                                  seed=seed)
    held_out = [(r, t) for r, t in zip(unique, y) if json.dumps(r["block"], sort_keys=True) in test]
    ungated = {run_key(r["block"], r["run"]): t for r, t in held_out if r["run"]["option"] == "none"}
    scored = [(r, t) for r, t in held_out if run_key(r["block"], _none_run(r["block"])) in ungated]
    proportional = [ungated[run_key(r["block"], _none_run(r["block"]))]
                    * gated_block_features(r["block"], r["run"], batch_size, hw)["macs_share"] for r, _ in scored]
    return {"measured": np.array([t for _, t in scored]),
            "predicted": model.predict([r["block"] for r, _ in scored], [r["run"] for r, _ in scored]),
            "proportional": np.array(proportional), "blocks_train": len(signatures) - n_test, "blocks_test": n_test,
            "batch_size": batch_size}


def score_holdout(held_out: Mapping[str, Any]) -> dict[str, Any]:
    """Score a :func:`holdout_predictions` result: ``model`` and ``proportional`` metrics
    (``within_10pct``, ``within_5pct``, ``mape``, ``kendall_tau``) over the held-out runs, with
    ``blocks_train``, ``blocks_test``, ``runs_test`` and ``batch_size``."""
    measured = held_out["measured"]
    return {"blocks_train": held_out["blocks_train"], "blocks_test": held_out["blocks_test"],
            "batch_size": held_out["batch_size"], "runs_test": len(measured),
            "model": _metrics(held_out["predicted"], measured),
            "proportional": _metrics(held_out["proportional"], measured)}


def evaluate_gated_latency(records: Iterable[Mapping[str, Any]], hw: HardwareFacts, holdout: float = 0.25,
                           seed: int = 0) -> dict[str, Any]:
    """Return :func:`score_holdout` of :func:`holdout_predictions` on ``records``."""
    return score_holdout(holdout_predictions(records, hw, holdout, seed))


def fit_for_model(model: nn.Module, input_shape: Sequence[int], store: Any, protocol: MeasurementProtocol,
                  names: Collection[str] | None = None, passes: int = 2, progress: bool = True) -> GatedBlockLatency:
    """Profile the gateable blocks of ``model`` (those at ``names`` if given) that ``store`` lacks, then fit.

    The new runs are stored with source ``"train"``, so they serve later fits too. The model is fitted
    on every gated-block record of the protocol's batch size, the blocks of other subnets included.
    """
    from predictors.build import hardware_facts_from_fingerprint

    blocks = collect_blocks([(model, input_shape)], names)
    measured = profile_gated_blocks(blocks, store, protocol, passes, progress=progress, source="train")
    records = store.gated_block_records(protocol.batch_size)
    log.info("Gated-block latency: %d measurements taken for this subnet's %d blocks; fitting on %d records.",
             measured, len(blocks), len(records))
    return GatedBlockLatency.fit(records, hardware_facts_from_fingerprint(store.fingerprint))

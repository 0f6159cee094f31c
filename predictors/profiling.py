"""Latency measurement: single modules with profiler records, whole subnets, and whole spaces.

:func:`measure_module` (from :mod:`predictors.measurement`) warms up, times ``repeats`` forward
passes with ``time.perf_counter`` (synchronising CUDA around each), and reports the median with
its spread. One extra pass under ``torch.profiler`` keeps per-operator records on CPU and
per-kernel launch records on CUDA, which the predictor's features use to explain tails.
:func:`profile_space` fills a profile store with layer microbenchmarks, width sweeps and whole
subnets, in interleaved passes that can resume.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nas.spaces.layers import LayerSpec
from predictors.fingerprint import device_fingerprint, fingerprints_match
from predictors.measurement import Measurement, measure_module, thread_count
from predictors.modules import build_layer_module, fold_batchnorm, layer_input_shape
from predictors.profiler_records import ProfilingError
from predictors.protocol import (
    DTYPES,
    RUNTIMES,
    DeviceUnavailableError,
    HardwareConfigError,
    MeasurementProtocol,
    check_device_available,
)
from predictors.runtimes import RuntimeFailedError

__all__ = [
    "DTYPES",
    "RUNTIMES",
    "DeviceUnavailableError",
    "HardwareConfigError",
    "Measurement",
    "MeasurementProtocol",
    "ProfileSummary",
    "ProfilingError",
    "RuntimeFailedError",
    "check_device_available",
    "enumerate_layers",
    "fold_batchnorm_checked",
    "measure_arch",
    "measure_module",
    "profile_space",
    "sample_subnets",
    "width_sweep",
]

logger = logging.getLogger(__name__)


# -- whole subnets --------------------------------------------------------------------------


def measure_arch(space: Any, arch: Any, protocol: MeasurementProtocol, supernet: Any = None) -> Measurement:
    """Time the subnet ``arch`` of ``space`` as the device runs it: exported, eval mode, BatchNorm folded.

    The subnet comes from ``supernet.extract(arch)``, or from a freshly built supernet (random
    weights, which is fine for latency) when ``supernet`` is ``None``. The supernet stays on its
    device: the extracted subnet moves to the CPU for folding, then to the protocol's device.
    """
    # The preparation runs with the protocol's thread count too: on a shared CPU, torch's default
    # thread pool makes these few untimed passes cost more than the timed ones.
    with thread_count(protocol.threads):
        with torch.random.fork_rng(devices=[]):
            if supernet is None:
                supernet = space.build_supernet()
            model = supernet.extract(arch).eval().cpu()
        input_shape = tuple(space.input_shape(arch))
        model = fold_batchnorm_checked(model, input_shape)
    return measure_module(model, input_shape, protocol)


# Model classes already warned about BatchNorm layers that fold_batchnorm left as they are.
_WARNED_UNFOLDED: set[str] = set()


def _warn_unfolded(folded: nn.Module, count: int) -> None:
    """Warn, once per model class, when BatchNorm layers are left in ``folded`` after folding."""
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    name = type(folded).__name__
    if left and name not in _WARNED_UNFOLDED:
        _WARNED_UNFOLDED.add(name)
        logger.warning("Folded %d BatchNorm layers of %s into convolutions, but %d are left and are timed as "
                       "operators of their own. predictors.modules.fold_batchnorm folds a BatchNorm2d registered "
                       "right after its Conv2d (or named bn<suffix> beside conv<suffix>).", count, name, left)


def fold_batchnorm_checked(model: nn.Module, input_shape: tuple[int, ...], tolerance: float = 1e-3) -> nn.Module:
    """Return a BatchNorm-folded copy of ``model`` if it gives the same outputs, else ``model`` itself.

    Outputs count as the same when the largest absolute difference on one random batch is at
    most ``tolerance * (1 + max |output|)``.
    """
    folded = copy.deepcopy(model).eval()
    count = fold_batchnorm(folded)
    _warn_unfolded(folded, count)
    if count == 0:
        return model

    device = next(model.parameters()).device
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        expected = model(x)
        actual = folded(x)
    error = float((expected - actual).abs().max())
    bound = tolerance * (1.0 + float(expected.abs().max()))
    if error > bound:
        logger.warning(
            "Folding %d BatchNorm layers changed the outputs of %s by %.3g (allowed %.3g); "
            "timing the unfolded model instead.",
            count,
            type(model).__name__,
            error,
            bound,
        )
        return model
    return folded


# -- profiling a whole space ----------------------------------------------------------------

# Spaces with at most this many architectures have their layer set enumerated exhaustively.
# Larger spaces take their layers from this many sampled architectures plus the largest and smallest.
MAX_ENUMERATED_ARCHS = 20_000


@dataclass
class ProfileSummary:
    """Counts and timings of one :func:`profile_space` call.

    ``*_measured`` and ``*_reused`` count (item, pass) runs; ``distinct_*`` count items.
    ``busy_runs`` counts the runs measured while the 1-minute load average exceeded the logical
    core count, whose latencies may include time spent waiting for a core.
    """

    fingerprint_id: str
    store_dir: str
    distinct_layers: int
    sweep_layers: int
    distinct_subnets: int
    passes: int
    layers_measured: int
    layers_reused: int
    subnets_measured: int
    subnets_reused: int
    wall_s: float
    noise_floor: dict[str, Any]
    busy_runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _WorkItem:
    """One thing to measure: a layer (``spec``) or a subnet (``arch``), with its store key."""

    kind: str
    key: str
    spec: LayerSpec | None = None
    arch: Any = None


def enumerate_layers(space: Any, seed: int, max_archs: int = MAX_ENUMERATED_ARCHS) -> list[LayerSpec]:
    """Return every distinct :class:`LayerSpec` that ``space``'s architectures run, sorted by key.

    Spaces with at most ``max_archs`` architectures are enumerated exhaustively. Larger spaces use
    ``max_archs`` architectures drawn with ``np.random.default_rng(seed)`` plus the largest and
    smallest, so a layer that only rare combinations produce may be missing.
    """
    choices = space.choices()
    # Exact integers: Once-for-All's ImageNet space has about 7e22 architectures, past int64.
    total = math.prod(len(options) for options in choices.values())
    if total <= max_archs:
        archs = [space.arch_from_choices(dict(zip(choices, values))) for values in itertools.product(*choices.values())]
    else:
        rng = np.random.default_rng(seed)
        archs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(max_archs)]
        logger.info("Space %s has %d architectures; taking its layers from %d of them.", space.name, total, len(archs))

    distinct = {layer for arch in archs for layer in space.layers(arch)}
    return sorted(distinct, key=LayerSpec.key)


def width_sweep(layers: list[LayerSpec], width_step: int) -> list[LayerSpec]:
    """Return conv layers that fill in output widths between the space's choices.

    For every distinct ungrouped "conv" shape (input channels, input size, kernel, stride,
    activation) the sweep covers output channels ``width_step, 2 * width_step, ...`` up to the
    widest that the space uses for that shape, plus that widest value. Layers already in
    ``layers`` are left out.
    """
    if isinstance(width_step, bool) or not isinstance(width_step, int) or width_step < 1:
        raise ValueError(f"profile.width_step must be a positive integer, but got {width_step!r}.")
    widest: dict[tuple[int, int, int, int, str], int] = {}
    for layer in layers:
        if layer.op == "conv" and layer.groups == 1:
            shape = (layer.in_channels, layer.in_size, layer.kernel_size, layer.stride, layer.act)
            widest[shape] = max(widest.get(shape, 0), layer.out_channels)

    existing = set(layers)
    sweep = set()
    for (in_channels, in_size, kernel, stride, act), top in widest.items():
        for out_channels in {*range(width_step, top + 1, width_step), top}:
            spec = LayerSpec("conv", in_channels, out_channels, in_size, kernel, stride, act=act)
            if spec not in existing:
                sweep.add(spec)
    return sorted(sweep, key=LayerSpec.key)


def sample_subnets(space: Any, n_subnets: int, seed: int) -> list[Any]:
    """Return ``n_subnets`` distinct architectures: largest, smallest, then draws from ``default_rng(seed)``.

    The draws are a prefix-stable sequence, so a larger ``n_subnets`` with the same seed extends
    the earlier list. Fewer come back when the space has fewer distinct architectures than
    ``n_subnets`` or ``20 * n_subnets`` draws find no more.
    """
    if n_subnets <= 0:
        return []
    rng = np.random.default_rng(seed)
    archs: dict[str, Any] = {}
    for arch in (space.largest(), space.smallest()):
        archs.setdefault(arch.to_json(), arch)
    attempts = 0
    while len(archs) < n_subnets and attempts < 20 * n_subnets:
        arch = space.sample(rng)
        archs.setdefault(arch.to_json(), arch)
        attempts += 1
    if len(archs) < n_subnets:
        logger.info("Found %d distinct subnets of %d requested after %d draws.", len(archs), n_subnets, attempts)
    return list(archs.values())[:n_subnets]


def profile_space(
    space: Any,
    store: Any,
    protocol: MeasurementProtocol,
    n_subnets: int,
    seed: int,
    passes: int = 2,
    width_step: int | None = None,
    progress: bool = True,
) -> ProfileSummary:
    """Build or extend ``store`` with layer microbenchmarks, width sweeps and whole subnets of ``space``.

    Each item is measured ``passes`` times. The (item, pass) runs are shuffled with
    ``np.random.default_rng(seed)`` so that a slow minute on the machine spreads over all parts
    of the data instead of biasing one. Runs already in the store for the same device, batch
    size, thread count, dtype and runtime are skipped, whatever warm-up and repeat counts they were
    timed with. To time again with more repeats, profile into a new work directory. Every new run
    is appended to the store as soon as it finishes, so an interrupted call resumes where it stopped.

    Args:
        space: a :class:`nas.spaces.SearchSpace`.
        store: a :class:`predictors.store.ProfileStore` opened for this protocol's device.
        n_subnets: whole subnets to measure, the largest and smallest included; 0 skips subnets.
        seed: seeds subnet sampling and the run order.
        passes: independent measurements of each item (2 gives the noise floor).
        width_step: output-channel step of the conv width sweeps; ``None`` means 8.
        progress: show a tqdm progress bar.
    """
    from predictors.store import arch_key

    width_step = 8 if width_step is None else width_step
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"profile.passes must be a positive integer, but got {passes!r}.")
    _check_store_device(store, protocol)
    started = time.perf_counter()

    layers = enumerate_layers(space, seed)
    sweep = width_sweep(layers, width_step)
    archs = sample_subnets(space, n_subnets, seed)
    items = [_WorkItem("layer", spec.key(), spec=spec) for spec in layers + sweep]
    items += [_WorkItem("subnet", arch_key(arch.to_dict()), arch=arch) for arch in archs]

    done = {("layer", r["key"], r["pass"]) for r in store.layer_records(protocol.batch_size)}
    done |= {
        ("subnet", r["key"], r["pass"])
        for r in store.subnet_records(space.config_hash(), protocol.batch_size, source="profile")
    }
    runs = [(item, p) for item in items for p in range(passes)]
    pending = [(item, p) for item, p in runs if (item.kind, item.key, p) not in done]
    order = np.random.default_rng([seed, 1]).permutation(len(pending))
    pending = [pending[i] for i in order]
    logger.info(
        "Profiling space %s into %s: %d layers (%d from width sweeps), %d subnets, %d passes; "
        "%d runs to take, %d already stored.",
        space.name, store.directory, len(layers) + len(sweep), len(sweep), len(archs), passes,
        len(pending), len(runs) - len(pending),
    )

    measured, busy_runs = _run_pending(space, store, protocol, pending, progress)
    wall_s = time.perf_counter() - started
    reused = Counter(item.kind for item, p in runs) - measured
    summary = ProfileSummary(
        fingerprint_id=store.fingerprint_id,
        store_dir=str(store.directory),
        distinct_layers=len(layers) + len(sweep),
        sweep_layers=len(sweep),
        distinct_subnets=len(archs),
        passes=passes,
        layers_measured=measured["layer"],
        layers_reused=reused["layer"],
        subnets_measured=measured["subnet"],
        subnets_reused=reused["subnet"],
        busy_runs=busy_runs,
        wall_s=wall_s,
        noise_floor=store.noise_floor(space.config_hash(), protocol.batch_size),
    )
    logger.info("Profiling finished in %.1f s: %s", wall_s, summary.to_dict())
    if busy_runs:
        logger.warning(
            "%d of %d runs were measured while the load average exceeded the %s logical cores, so other "
            "processes competed for the CPU. %s", busy_runs, len(pending), os.cpu_count(),
            busy_advice(busy_runs, len(pending), store.directory),
        )
    return summary


# Above this share of busy runs, profiling again on a quiet machine is the advice.
BUSY_SHARE_TO_REPROFILE = 0.1


def busy_advice(busy_runs: int, runs: int, store_dir: Any) -> str:
    """Return what to do about ``busy_runs`` of ``runs`` measured on a busy machine."""
    if busy_runs > BUSY_SHARE_TO_REPROFILE * runs:
        return f"Move {store_dir} away and profile again on a quiet machine."
    return ("So few runs are unlikely to matter; the noise floor and the predictor's held-out accuracy show "
            "whether they did.")


def _run_pending(
    space: Any, store: Any, protocol: MeasurementProtocol, pending: list[tuple[_WorkItem, int]], progress: bool
) -> tuple[Counter[str], int]:
    """Measure and store each (item, pass) run in order.

    Returns:
        The count of runs per item kind, and the count of runs taken on a busy machine.
    """
    measured: Counter[str] = Counter()
    busy_runs = 0
    cores = os.cpu_count() or 1
    supernet = None
    for item, pass_index in tqdm(pending, desc="profiling", unit="run", disable=not progress):
        if item.kind == "layer":
            assert item.spec is not None
            with torch.random.fork_rng(devices=[]):
                module = build_layer_module(item.spec)
            m = measure_module(module, layer_input_shape(item.spec), protocol)
            store.add_layer(item.spec, m, pass_index)
        else:
            if supernet is None:
                with torch.random.fork_rng(devices=[]):
                    supernet = space.build_supernet()
            m = measure_arch(space, item.arch, protocol, supernet=supernet)
            store.add_subnet(
                space.name, space.config_hash(), item.arch.to_dict(), space.layers(item.arch), m, pass_index,
                source="profile",
            )
        measured[item.kind] += 1
        if m.load_avg_1m is not None and m.load_avg_1m > cores:
            busy_runs += 1
    return measured, busy_runs


def _check_store_device(store: Any, protocol: MeasurementProtocol) -> None:
    """Raise ``ValueError`` unless ``store`` belongs to the device and thread count of ``protocol``."""
    expected = device_fingerprint(protocol)
    same, differing = fingerprints_match(store.fingerprint, expected)
    if not same:
        raise ValueError(
            f"Profile store {store.directory} belongs to another device or runtime (fields {differing} differ); "
            "open it with ProfileStore(root, device_fingerprint(protocol))."
        )
    if store.fingerprint.get("threads") != expected["threads"]:
        raise ValueError(
            f"Profile store was opened for threads={store.fingerprint.get('threads')} but the protocol uses "
            f"threads={expected['threads']}; open it with ProfileStore(root, device_fingerprint(protocol))."
        )

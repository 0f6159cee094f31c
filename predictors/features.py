"""Layer and network features for latency prediction.

Features describe how a device executes a :class:`~nas.spaces.layers.LayerSpec`, not only how much
arithmetic it holds. On a CPU, vectorised kernels process output channels in blocks of the SIMD
width, so a layer with 17 output channels costs as much as one with 32 when the SIMD width is 16;
work is split over threads, and a share of threads can be idle. On a GPU, an implicit GEMM is
cut into output tiles that run in waves over the streaming multiprocessors (SMs), and a part-empty
last wave costs as much as a full one. The features below expose these staircases so that a tree
model can learn them.

Units: MACs are multiply-accumulates for the whole batch; bytes assume float32 (4 bytes per
element); arithmetic intensity is MACs per byte moved.

Network features are sums of per-layer contributions (per operator group and in total), so a batch
of architectures turns into features with one sparse matrix product over the distinct layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from nas.spaces.layers import LayerSpec

__all__ = [
    "BYTES_PER_ELEMENT",
    "GPU_TILE_SHAPES",
    "HardwareFacts",
    "NetworkFeaturizer",
    "FeatureError",
    "frame_to_matrix",
    "gemm_shape",
    "gpu_tile_waves",
    "layer_feature_names",
    "layer_features",
    "network_contributions",
    "network_feature_names",
    "op_group",
]

BYTES_PER_ELEMENT = 4
# Output tile shapes (rows of M by columns of N) that cuDNN and CUTLASS implicit-GEMM kernels
# commonly use for float32 and mixed precision.
GPU_TILE_SHAPES: tuple[tuple[int, int], ...] = ((64, 64), (128, 64), (128, 128))
# Elements that one thread block of an element-wise GPU kernel handles: 256 threads times 4
# elements, a typical launch configuration. An estimate, used only as a feature.
GPU_ELEMENTWISE_BLOCK = 1024
OP_GROUPS = ("conv", "dwconv", "add", "se", "pool", "linear")


class FeatureError(ValueError):
    """Feature input that cannot be turned into the predictor's feature matrix."""


@dataclass(frozen=True)
class HardwareFacts:
    """Facts about the device that shape the latency staircases.

    Attributes:
        device: "cpu" or "cuda".
        simd_width: float32 lanes per SIMD register on a CPU (16 with AVX-512, 8 with AVX2, 4 with
            NEON or SSE). Ignored on a GPU.
        threads: intra-op threads a CPU run uses. Ignored on a GPU.
        sm_count: streaming multiprocessors of a GPU; ``None`` on a CPU.
    """

    device: str = "cpu"
    simd_width: int = 8
    threads: int = 1
    sm_count: int | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise FeatureError(f"HardwareFacts.device must be 'cpu' or 'cuda', but got {self.device!r}.")
        if self.simd_width < 1 or self.threads < 1:
            raise FeatureError(
                f"HardwareFacts.simd_width and threads must be >= 1, but got {self.simd_width} and {self.threads}."
            )
        if self.device == "cuda" and (self.sm_count is None or self.sm_count < 1):
            raise FeatureError(f"HardwareFacts for a GPU needs sm_count >= 1, but got {self.sm_count!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HardwareFacts:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise FeatureError(f"Unknown HardwareFacts keys {unknown}; allowed keys are {sorted(names)}.")
        return cls(**dict(data))


def op_group(layer: LayerSpec) -> str:
    """Return the operator group of ``layer``: depthwise convolutions apart from dense ones, pools together."""
    if layer.op == "conv":
        return "dwconv" if layer.groups > 1 and layer.groups == layer.in_channels else "conv"
    if layer.op in ("maxpool", "gap"):
        return "pool"
    return layer.op


def gemm_shape(layer: LayerSpec, batch_size: int) -> tuple[int, int, int, int]:
    """Return the im2col GEMM of a layer as ``(M, N, K, gemm_count)``.

    A convolution is ``groups`` GEMMs of M = batch * H_out * W_out rows, N = out_channels / groups
    columns and depth K = in_channels / groups * kernel_size**2. A linear layer is one GEMM with
    M = batch, N = out_features and K = in_features. Other operators are not GEMMs: ``(0, 0, 0, 0)``.
    """
    if layer.op == "conv":
        m = batch_size * layer.out_size**2
        n = layer.out_channels // layer.groups
        k = layer.in_channels // layer.groups * layer.kernel_size**2
        return m, n, k, layer.groups
    if layer.op == "linear":
        return batch_size, layer.out_channels, layer.in_channels, 1
    return 0, 0, 0, 0


def gpu_tile_waves(m: int, n: int, gemm_count: int, tile: tuple[int, int], sm_count: int) -> tuple[int, int, float]:
    """Return ``(tiles, waves, last_wave_utilisation)`` of a tiled GEMM on ``sm_count`` SMs.

    tiles = ceil(M / tile_m) * ceil(N / tile_n) * gemm_count, with one tile per SM at a time;
    waves = ceil(tiles / sm_count); the last wave keeps ``tiles - (waves - 1) * sm_count`` SMs busy,
    so its utilisation is that count over ``sm_count`` (1.0 for a full wave, 0.0 without tiles).
    """
    if m == 0 or n == 0 or gemm_count == 0:
        return 0, 0, 0.0
    tiles = math.ceil(m / tile[0]) * math.ceil(n / tile[1]) * gemm_count
    waves = math.ceil(tiles / sm_count)
    last = tiles - (waves - 1) * sm_count
    return tiles, waves, last / sm_count


def _base_features(layer: LayerSpec, batch_size: int) -> dict[str, float]:
    macs = batch_size * layer.macs
    bytes_in = BYTES_PER_ELEMENT * batch_size * layer.input_elements
    bytes_out = BYTES_PER_ELEMENT * batch_size * layer.output_elements
    bytes_weight = BYTES_PER_ELEMENT * layer.params
    bytes_total = bytes_in + bytes_out + bytes_weight
    m, n, k, gemms = gemm_shape(layer, batch_size)
    group = op_group(layer)
    out: dict[str, float] = {
        "batch_size": batch_size,
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "in_size": layer.in_size,
        "out_size": layer.out_size,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "groups": layer.groups,
        "macs": macs,
        "log_macs": math.log1p(macs),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "bytes_weight": bytes_weight,
        "bytes_total": bytes_total,
        "arith_intensity": macs / bytes_total,
        "gemm_m": m,
        "gemm_n": n,
        "gemm_k": k,
        "act_relu": float(layer.act == "relu"),
        "act_hswish": float(layer.act == "hswish"),
    }
    for name in OP_GROUPS:
        out[f"is_{name}"] = float(group == name)
    out["is_gap"] = float(layer.op == "gap")
    return out


def _cpu_features(layer: LayerSpec, batch_size: int, hw: HardwareFacts) -> dict[str, float]:
    """SIMD blocking and thread split of a CPU kernel.

    Output channels run in blocks of ``simd`` lanes, and many kernels unroll two registers, hence
    also blocks of ``2 * simd``. Work units for the thread split are one output row of one block of
    ``2 * simd`` channels of one image: units = batch * ceil(C_out / (2 * simd)) * H_out; each thread
    runs ceil(units / threads) of them, and thread utilisation is units / (threads * that).
    """
    simd = hw.simd_width
    channels = layer.out_channels
    blocks = math.ceil(channels / simd)
    blocks_2x = math.ceil(channels / (2 * simd))
    units = batch_size * blocks_2x * layer.out_size
    per_thread = math.ceil(units / hw.threads)
    return {
        "cpu_oc_blocks": blocks,
        "cpu_oc_blocks_2x": blocks_2x,
        "cpu_oc_remainder": channels % simd,
        "cpu_oc_util": channels / (blocks * simd),
        "cpu_ic_blocks": math.ceil(layer.in_channels / simd),
        "cpu_padded_macs": batch_size * _padded_macs(layer, simd),
        "cpu_per_thread_units": per_thread,
        "cpu_thread_util": units / (per_thread * hw.threads),
    }


def _padded_macs(layer: LayerSpec, simd: int) -> float:
    """Return one image's MACs with each output channel count rounded up to whole SIMD blocks."""
    def padded(channels: int) -> int:
        return math.ceil(channels / simd) * simd

    if layer.op == "se":
        # The reduce convolution outputs the reduced width, the expand convolution and the rescaling
        # multiply the input channels.
        conv = layer.in_channels * layer.out_channels
        rescale = layer.in_channels * layer.in_size**2
        return (conv * padded(layer.out_channels) / layer.out_channels
                + (conv + rescale) * padded(layer.in_channels) / layer.in_channels)
    return layer.macs * padded(layer.out_channels) / layer.out_channels


def _gpu_features(layer: LayerSpec, batch_size: int, hw: HardwareFacts) -> dict[str, float]:
    """Tile and wave counts of the layer's implicit GEMM; see :func:`gpu_tile_waves`.

    ``gpu_wave_k_<tile>`` is waves * K: a GEMM tile's time grows with its depth K, so this is the
    wave-quantised work of the layer. Element-wise operators get ``gpu_eltwise_waves``: blocks of
    ``GPU_ELEMENTWISE_BLOCK`` output elements in waves over the SMs.
    """
    assert hw.sm_count is not None
    m, n, k, gemms = gemm_shape(layer, batch_size)
    out: dict[str, float] = {}
    if op_group(layer) == "dwconv":
        # cuDNN and PyTorch run depthwise convolutions as direct kernels over the output elements, not
        # as one GEMM of a single column per channel: every tile shape gets the element blocks' waves.
        blocks, waves, last = gpu_tile_waves(batch_size * layer.output_elements, 1, 1, (GPU_ELEMENTWISE_BLOCK, 1),
                                             hw.sm_count)
        for tile in GPU_TILE_SHAPES:
            name = f"{tile[0]}x{tile[1]}"
            out.update({f"gpu_tiles_{name}": blocks, f"gpu_waves_{name}": waves, f"gpu_last_wave_util_{name}": last,
                        f"gpu_wave_k_{name}": waves * layer.kernel_size**2})
        out["gpu_eltwise_waves"] = waves
        return out
    for tile in GPU_TILE_SHAPES:
        name = f"{tile[0]}x{tile[1]}"
        tiles, waves, last = gpu_tile_waves(m, n, gemms, tile, hw.sm_count)
        out[f"gpu_tiles_{name}"] = tiles
        out[f"gpu_waves_{name}"] = waves
        out[f"gpu_last_wave_util_{name}"] = last
        out[f"gpu_wave_k_{name}"] = waves * k
    elements = batch_size * max(layer.output_elements, layer.input_elements)
    blocks = math.ceil(elements / GPU_ELEMENTWISE_BLOCK)
    out["gpu_eltwise_waves"] = 0 if m else math.ceil(blocks / hw.sm_count)
    return out


def layer_features(layer: LayerSpec, batch_size: int, hw: HardwareFacts) -> dict[str, float]:
    """Compute the features of one layer at ``batch_size`` on ``hw``; keys are :func:`layer_feature_names`."""
    if batch_size < 1:
        raise FeatureError(f"batch_size must be >= 1, but got {batch_size}.")
    out = _base_features(layer, batch_size)
    if hw.device == "cpu":
        out.update(_cpu_features(layer, batch_size, hw))
    else:
        out.update(_gpu_features(layer, batch_size, hw))
    return {key: float(value) for key, value in out.items()}


def layer_feature_names(hw: HardwareFacts) -> list[str]:
    """Return the sorted layer feature names for ``hw``: the fixed column order of the layer model."""
    probe = LayerSpec("conv", 8, 8, 8, 3)
    return sorted(layer_features(probe, 1, hw))


# Convolutions are also summed per kernel size and per output size, because kernels of another
# kernel size or feature-map size run at another efficiency (MACs per ms) on the same device.
KERNEL_BUCKETS = ("1", "3", "5", "7", "other")
# Upper bounds (inclusive) of the output-size buckets, in pixels; "big" is everything larger.
SIZE_BUCKETS = (8, 16, 32, 64)


def _kernel_bucket(kernel_size: int) -> str:
    text = str(kernel_size)
    return text if text in KERNEL_BUCKETS else "other"


def _size_bucket(size: int) -> str:
    return next((str(bound) for bound in SIZE_BUCKETS if size <= bound), "big")


def network_contributions(layer: LayerSpec, batch_size: int, hw: HardwareFacts) -> dict[str, float]:
    """Compute one layer's additive share of the network features.

    Every network feature except the derived ones (see :class:`NetworkFeaturizer`) is the sum of
    these shares over the layers: per operator group the count, MACs and bytes moved; for dense
    and depthwise convolutions also MACs and bytes per kernel-size bucket (``conv_k3_macs``) and
    per output-size bucket (``dwconv_s16_bytes`` for outputs of 9 to 16 pixels), and the
    device-specific work (SIMD-padded MACs on a CPU, wave-quantised work on a GPU); and totals.
    """
    feats = layer_features(layer, batch_size, hw)
    group = op_group(layer)
    out = {f"{g}_{what}": 0.0 for g in OP_GROUPS for what in ("count", "macs", "bytes")}
    out.update({f"{group}_count": 1.0, f"{group}_macs": feats["macs"], f"{group}_bytes": feats["bytes_total"]})
    out.update(
        {
            "total_layers": 1.0,
            "total_macs": feats["macs"],
            "total_bytes": feats["bytes_total"],
            "total_bytes_weight": feats["bytes_weight"],
            "total_activation_bytes": feats["bytes_in"] + feats["bytes_out"],
        }
    )

    buckets = [f"k{b}" for b in KERNEL_BUCKETS] + [f"s{b}" for b in (*SIZE_BUCKETS, "big")]
    for g in ("conv", "dwconv"):
        for bucket in buckets:
            out[f"{g}_{bucket}_macs"] = 0.0
            out[f"{g}_{bucket}_bytes"] = 0.0
    if group in ("conv", "dwconv"):
        for bucket in (f"k{_kernel_bucket(layer.kernel_size)}", f"s{_size_bucket(layer.out_size)}"):
            out[f"{group}_{bucket}_macs"] = feats["macs"]
            out[f"{group}_{bucket}_bytes"] = feats["bytes_total"]

    if hw.device == "cpu":
        out["total_cpu_padded_macs"] = feats["cpu_padded_macs"]
        out["total_cpu_thread_rounds"] = feats["cpu_per_thread_units"]
        for g in ("conv", "dwconv"):
            out[f"{g}_cpu_padded_macs"] = feats["cpu_padded_macs"] if group == g else 0.0
    else:
        for tile in GPU_TILE_SHAPES:
            name = f"{tile[0]}x{tile[1]}"
            out[f"total_gpu_waves_{name}"] = feats[f"gpu_waves_{name}"]
            out[f"total_gpu_wave_k_{name}"] = feats[f"gpu_wave_k_{name}"]
            for g in ("conv", "dwconv"):
                out[f"{g}_gpu_wave_k_{name}"] = feats[f"gpu_wave_k_{name}"] if group == g else 0.0
        out["total_gpu_eltwise_waves"] = feats["gpu_eltwise_waves"]
    return out


# Per-layer latency columns that the predictor supplies (measured table, layer model).
LATENCY_SUM_FEATURES = ("lut_sum_ms", "layer_model_sum_ms")


def network_feature_names(hw: HardwareFacts, with_latency_sums: bool) -> list[str]:
    """Return the sorted network feature names for ``hw``.

    ``with_latency_sums`` adds ``lut_sum_ms`` (measured layer latencies, the layer model's
    prediction where a layer was not measured), ``layer_model_sum_ms`` and ``lut_coverage``.
    """
    names = set(network_contributions(LayerSpec("conv", 8, 8, 8, 3), 1, hw))
    names.update(("arith_intensity", "input_size"))
    if with_latency_sums:
        names.update(LATENCY_SUM_FEATURES)
        names.add("lut_coverage")
    return sorted(names)


LayerColumnsFn = Callable[[list[LayerSpec]], Mapping[str, np.ndarray]]


class NetworkFeaturizer:
    """Turns batches of layer lists into network feature matrices, caching per distinct layer.

    Each distinct :class:`LayerSpec` gets a row index the first time it appears, and its
    contributions are computed once. A batch of architectures becomes a sparse (architectures x
    distinct layers) count matrix, and the summed features are that matrix times the contribution
    table. Not thread-safe: use one instance per thread.

    Args:
        batch_size: images per forward pass.
        hw: the device facts.
        layer_columns: optional function from newly seen layers to extra per-layer columns (for
            example ``lut_sum_ms``, ``layer_model_sum_ms`` and ``lut_measured``), called once per
            batch of new layers; each column is summed over an architecture's layers like the others.
    """

    def __init__(self, batch_size: int, hw: HardwareFacts, layer_columns: LayerColumnsFn | None = None) -> None:
        if batch_size < 1:
            raise FeatureError(f"batch_size must be >= 1, but got {batch_size}.")
        self.batch_size = batch_size
        self.hw = hw
        self.layer_columns = layer_columns
        self.sum_names = sorted(network_contributions(LayerSpec("conv", 8, 8, 8, 3), 1, hw))
        self.index: dict[LayerSpec, int] = {}
        self.layers: list[LayerSpec] = []
        self._table = np.zeros((0, len(self.sum_names)))
        self._extra_names: list[str] = []

    def _extend(self, new_layers: list[LayerSpec]) -> None:
        rows = []
        for layer in new_layers:
            contrib = network_contributions(layer, self.batch_size, self.hw)
            rows.append([contrib[name] for name in self.sum_names])
        block = np.asarray(rows, dtype=np.float64)
        if self.layer_columns is not None:
            extra = self.layer_columns(new_layers)
            names = sorted(extra)
            if self._extra_names and names != self._extra_names:
                raise FeatureError(f"layer_columns returned columns {names}, but earlier calls returned {self._extra_names}.")
            self._extra_names = names
            columns = [np.asarray(extra[name], dtype=np.float64).reshape(len(new_layers), 1) for name in names]
            block = np.hstack([block, *columns])
        self._table = block if self._table.shape[0] == 0 else np.vstack([self._table, block])

    def encode(self, layer_lists: Sequence[Sequence[LayerSpec]]) -> sparse.csr_matrix:
        """Return the (architectures x distinct layers) count matrix of ``layer_lists``."""
        index = self.index
        flat: list[int] = []
        indptr = [0]
        new_layers: list[LayerSpec] = []
        for layers in layer_lists:
            if not layers:
                raise FeatureError(f"Architecture {len(indptr) - 1} of the batch has no layers.")
            for layer in layers:
                position = index.get(layer)
                if position is None:
                    position = len(self.layers)
                    index[layer] = position
                    self.layers.append(layer)
                    new_layers.append(layer)
                flat.append(position)
            indptr.append(len(flat))
        if new_layers:
            self._extend(new_layers)
        data = np.ones(len(flat), dtype=np.float64)
        shape = (len(layer_lists), len(self.layers))
        counts = sparse.csr_matrix((data, np.asarray(flat, dtype=np.int64), np.asarray(indptr, dtype=np.int64)), shape=shape)
        counts.sum_duplicates()
        return counts

    def features(self, layer_lists: Sequence[Sequence[LayerSpec]]) -> pd.DataFrame:
        """Compute the network features of ``layer_lists``, one row per architecture.

        Columns: the summed contributions of :func:`network_contributions`, the columns of
        ``layer_columns`` (summed too), ``arith_intensity`` (total MACs per byte), ``input_size``
        (the first layer's input height in pixels) and, when ``layer_columns`` supplies
        ``lut_measured``, ``lut_coverage`` (the share of layers with a measured latency) in its place.
        """
        counts = self.encode(layer_lists)
        sums = counts @ self._table
        frame = pd.DataFrame(sums, columns=[*self.sum_names, *self._extra_names])
        frame["arith_intensity"] = frame["total_macs"] / frame["total_bytes"]
        first = np.fromiter((layers[0].in_size for layers in layer_lists), dtype=np.float64, count=len(layer_lists))
        frame["input_size"] = first
        if "lut_measured" in frame.columns:
            frame["lut_coverage"] = frame.pop("lut_measured") / frame["total_layers"]
        return frame


def frame_to_matrix(frame: pd.DataFrame | Mapping[str, Iterable[float]], names: Sequence[str]) -> np.ndarray:
    """Return the columns ``names`` of ``frame`` as a float matrix, in that order.

    The column order of ``frame`` does not matter. Missing columns raise :class:`FeatureError`
    naming them; extra columns are rejected too, because they mean the features came from another
    hardware kind or feature version than the model was trained on.
    """
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(dict(frame))
    missing = sorted(set(names) - set(frame.columns))
    extra = sorted(set(frame.columns) - set(names))
    if missing or extra:
        raise FeatureError(
            f"Feature columns do not match the model: missing {missing}, unexpected {extra}. "
            "Compute features with the same HardwareFacts the predictor was trained with."
        )
    return frame.loc[:, list(names)].to_numpy(dtype=np.float64)

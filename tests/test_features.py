"""Layer and network features: hand-checked GEMM, tile, wave and SIMD counts, and batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nas.spaces.layers import LayerSpec
from predictors.features import (
    FeatureError,
    HardwareFacts,
    NetworkFeaturizer,
    frame_to_matrix,
    gemm_shape,
    gpu_tile_waves,
    layer_feature_names,
    layer_features,
    network_contributions,
    network_feature_names,
    op_group,
)

CPU = HardwareFacts(device="cpu", simd_width=16, threads=2)
GPU = HardwareFacts(device="cuda", sm_count=68)
# 3x3 convolution, 64 -> 96 channels on 28x28, stride 1: at batch 8 its im2col GEMM is
# M = 8 * 28 * 28 = 6272, N = 96, K = 64 * 3 * 3 = 576.
CONV = LayerSpec("conv", 64, 96, 28, kernel_size=3, stride=1, act="relu")


def test_gemm_shape_of_conv_and_linear() -> None:
    assert gemm_shape(CONV, 8) == (6272, 96, 576, 1)
    assert gemm_shape(LayerSpec("linear", 512, 10, 1), 4) == (4, 10, 512, 1)
    assert gemm_shape(LayerSpec("add", 32, 32, 14), 4) == (0, 0, 0, 0)


def test_gemm_shape_of_depthwise_conv() -> None:
    depthwise = LayerSpec("conv", 32, 32, 14, kernel_size=5, stride=2, groups=32)
    # 32 GEMMs of M = 2 * 7 * 7 = 98 rows, N = 1 column and K = 1 * 5 * 5 = 25.
    assert gemm_shape(depthwise, 2) == (98, 1, 25, 32)
    assert op_group(depthwise) == "dwconv"
    assert op_group(CONV) == "conv"


def test_tile_and_wave_counts_by_hand() -> None:
    # 128x64 tiles: ceil(6272 / 128) = 49 rows of tiles, ceil(96 / 64) = 2 columns -> 98 tiles;
    # on 68 SMs that is 2 waves, and the last wave runs 98 - 68 = 30 tiles.
    tiles, waves, last = gpu_tile_waves(6272, 96, 1, (128, 64), 68)
    assert tiles == 98
    assert waves == 2
    assert last == pytest.approx(30 / 68)

    # 64x64 tiles: 98 * 2 = 196 tiles -> 3 waves, the last with 196 - 136 = 60 tiles.
    assert gpu_tile_waves(6272, 96, 1, (64, 64), 68) == (196, 3, pytest.approx(60 / 68))
    # 128x128 tiles: 49 * 1 = 49 tiles fit in one part-empty wave.
    assert gpu_tile_waves(6272, 96, 1, (128, 128), 68) == (49, 1, pytest.approx(49 / 68))


def test_full_last_wave_used() -> None:
    # 136 tiles on 68 SMs: two full waves, the last one as busy as the first.
    assert gpu_tile_waves(136 * 64, 64, 1, (64, 64), 68) == (136, 2, 1.0)
    assert gpu_tile_waves(0, 64, 1, (64, 64), 68) == (0, 0, 0.0)


def test_tile_count_multiplies_by_groups() -> None:
    assert gpu_tile_waves(98, 1, 32, (64, 64), 30) == (64, 3, pytest.approx(4 / 30))
    assert gpu_tile_waves(0, 0, 0, (64, 64), 30) == (0, 0, 0.0)


def test_gpu_layer_features_match_hand_counts() -> None:
    feats = layer_features(CONV, 8, GPU)
    assert feats["gpu_tiles_128x64"] == 98
    assert feats["gpu_waves_128x64"] == 2
    assert feats["gpu_wave_k_128x64"] == 2 * 576
    assert feats["gpu_last_wave_util_64x64"] == pytest.approx(60 / 68)
    assert feats["gpu_eltwise_waves"] == 0
    assert not any(name.startswith("cpu_") for name in feats)


def test_gpu_depthwise_element_waves() -> None:
    from predictors.features import GPU_ELEMENTWISE_BLOCK

    depthwise = LayerSpec("conv", 32, 32, 14, kernel_size=5, stride=2, groups=32)
    feats = layer_features(depthwise, 2, GPU)
    # 2 images * 32 channels * 7 * 7 outputs, in blocks over 68 SMs; not 32 one-column GEMMs.
    blocks = -(-2 * 32 * 49 // GPU_ELEMENTWISE_BLOCK)
    waves = -(-blocks // 68)
    assert feats["gpu_tiles_128x64"] == blocks
    assert feats["gpu_waves_64x64"] == waves
    assert feats["gpu_eltwise_waves"] == waves
    assert feats["gpu_wave_k_128x64"] == waves * 25
    assert feats["gpu_last_wave_util_128x64"] == pytest.approx((blocks - (waves - 1) * 68) / 68)


def test_cpu_padding_squeeze_excite() -> None:
    se = LayerSpec("se", 144, 40, 28)
    feats = layer_features(se, 1, CPU)
    # The reduce convolution pads its 40 outputs to 48 lanes; the expand convolution and the rescaling
    # over 144 channels need no padding.
    conv, rescale = 144 * 40, 144 * 28 * 28
    assert se.macs == 2 * conv + rescale
    assert feats["cpu_padded_macs"] == pytest.approx(conv * 48 / 40 + conv + rescale)


def test_cpu_simd_and_thread_features() -> None:
    layer = LayerSpec("conv", 64, 40, 28, kernel_size=3)
    feats = layer_features(layer, 1, CPU)
    # 40 channels in blocks of 16 lanes: 3 blocks, 8 channels in the last, 40 / 48 lanes used.
    assert feats["cpu_oc_blocks"] == 3
    assert feats["cpu_oc_blocks_2x"] == 2
    assert feats["cpu_oc_remainder"] == 8
    assert feats["cpu_oc_util"] == pytest.approx(40 / 48)
    assert feats["cpu_ic_blocks"] == 4
    assert feats["cpu_padded_macs"] == pytest.approx(layer.macs * 48 / 40)
    # 1 image * 2 blocks of 32 channels * 28 rows = 56 units over 2 threads: 28 each, no idle thread.
    assert feats["cpu_per_thread_units"] == 28
    assert feats["cpu_thread_util"] == pytest.approx(1.0)

    three = layer_features(layer, 1, HardwareFacts(device="cpu", simd_width=16, threads=3))
    assert three["cpu_per_thread_units"] == 19
    assert three["cpu_thread_util"] == pytest.approx(56 / 57)


@pytest.mark.parametrize(("channels", "blocks", "blocks_2x"), [(16, 1, 1), (32, 2, 1), (64, 4, 2)])
def test_cpu_features_at_step_edges(channels: int, blocks: int, blocks_2x: int) -> None:
    # A whole number of 16-lane blocks: no remainder, every lane used, no padded work.
    layer = LayerSpec("conv", 64, channels, 28, kernel_size=3)
    feats = layer_features(layer, 1, CPU)
    assert feats["cpu_oc_blocks"] == blocks
    assert feats["cpu_oc_blocks_2x"] == blocks_2x
    assert feats["cpu_oc_remainder"] == 0
    assert feats["cpu_oc_util"] == pytest.approx(1.0)
    assert feats["cpu_padded_macs"] == pytest.approx(layer.macs)


def test_gpu_elementwise_waves_of_add_and_pool() -> None:
    # 2 images * 64 channels * 14 * 14 = 25,088 elements: 25 blocks of 1,024, one wave on 68 SMs.
    add = layer_features(LayerSpec("add", 64, 64, 14), 2, GPU)
    assert add["gpu_eltwise_waves"] == 1
    # 32 images: 401,408 elements, 392 blocks, ceil(392 / 68) = 6 waves.
    assert layer_features(LayerSpec("add", 64, 64, 14), 32, GPU)["gpu_eltwise_waves"] == 6
    # Global average pooling reads the whole input: the same count as the add at 2 images.
    assert layer_features(LayerSpec("gap", 64, 64, 14), 2, GPU)["gpu_eltwise_waves"] == 1


def test_bytes_and_intensity_are_float32() -> None:
    feats = layer_features(CONV, 8, CPU)
    assert feats["macs"] == 8 * CONV.macs
    assert feats["bytes_in"] == 4 * 8 * 64 * 28 * 28
    assert feats["bytes_out"] == 4 * 8 * 96 * 28 * 28
    assert feats["bytes_weight"] == 4 * (576 * 96 + 2 * 96)
    total = feats["bytes_in"] + feats["bytes_out"] + feats["bytes_weight"]
    assert feats["arith_intensity"] == pytest.approx(feats["macs"] / total)


def test_feature_names_are_sorted_and_complete() -> None:
    for hw in (CPU, GPU):
        names = layer_feature_names(hw)
        assert names == sorted(names)
        assert set(names) == set(layer_features(CONV, 2, hw))


def test_hardware_facts_reject_bad_values() -> None:
    with pytest.raises(FeatureError, match="sm_count"):
        HardwareFacts(device="cuda")
    with pytest.raises(FeatureError, match="'tpu'"):
        HardwareFacts(device="tpu")
    with pytest.raises(FeatureError, match="unknown|Unknown"):
        HardwareFacts.from_dict({"device": "cpu", "lanes": 8})


def test_network_features_sum_layer_contributions() -> None:
    first = [CONV, LayerSpec("add", 96, 96, 28, act="relu"), CONV]
    second = [LayerSpec("conv", 3, 64, 28, kernel_size=3), LayerSpec("gap", 64, 64, 28), LayerSpec("linear", 64, 10, 1)]
    frame = NetworkFeaturizer(2, CPU).features([first, second])

    assert sorted(frame.columns) == network_feature_names(CPU, with_latency_sums=False)
    for row, layers in enumerate((first, second)):
        expected: dict[str, float] = {}
        for layer in layers:
            for name, value in network_contributions(layer, 2, CPU).items():
                expected[name] = expected.get(name, 0.0) + value
        for name, value in expected.items():
            assert frame.loc[row, name] == pytest.approx(value), name
    assert frame.loc[0, "conv_count"] == 2
    assert frame.loc[0, "input_size"] == 28
    assert frame.loc[1, "pool_count"] == 1


def test_featurizer_calls_layer_columns_once_per_new_layer() -> None:
    seen: list[LayerSpec] = []

    def columns(layers: list[LayerSpec]) -> dict[str, np.ndarray]:
        seen.extend(layers)
        return {"lut_sum_ms": np.full(len(layers), 0.5), "lut_measured": np.ones(len(layers))}

    featurizer = NetworkFeaturizer(1, CPU, columns)
    first = featurizer.features([[CONV, CONV]])
    second = featurizer.features([[CONV], [CONV, LayerSpec("add", 96, 96, 28)]])

    assert seen == [CONV, LayerSpec("add", 96, 96, 28)]
    assert first.loc[0, "lut_sum_ms"] == pytest.approx(1.0)
    assert second.loc[1, "lut_sum_ms"] == pytest.approx(1.0)
    assert second.loc[1, "lut_coverage"] == pytest.approx(1.0)


def test_featurizer_rejects_empty_architecture() -> None:
    with pytest.raises(FeatureError, match="no layers"):
        NetworkFeaturizer(1, CPU).features([[CONV], []])


def test_frame_to_matrix_ignores_column_order() -> None:
    frame = NetworkFeaturizer(1, CPU).features([[CONV], [CONV, CONV]])
    names = sorted(frame.columns)
    shuffled = frame[list(np.random.default_rng(0).permutation(names))]
    np.testing.assert_array_equal(frame_to_matrix(frame, names), frame_to_matrix(shuffled, names))


def test_frame_to_matrix_names_missing_and_extra_columns() -> None:
    frame = pd.DataFrame({"a": [1.0], "c": [2.0]})
    with pytest.raises(FeatureError, match=r"missing \['b'\], unexpected \['c'\]"):
        frame_to_matrix(frame, ["a", "b"])

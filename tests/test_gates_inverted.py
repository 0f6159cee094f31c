"""Tests of gates on MobileNetV3 inverted residual blocks: equality at full keep, skip against mask, MACs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from nas.gates import (
    ChannelGate,
    ColumnGate,
    GatedInvertedResidual,
    GateRuntime,
    apply_gates,
    calibrate_keep_ratios,
    executed_macs,
    find_block_sites,
    keep_count,
)
from nas.gates.blocks import block_layout, gated_block_class
from nas.spaces import create_space
from nas.supernet.dynamic import recalibrate_batchnorm
from nas.supernet.mobilenet import InvertedResidual, MobileNetV3Subnet
from tests.conftest import assert_export_matches_eager, load_space_config, skip_and_mask_outputs

ALL = {"name": "feature", "placement": "all"}


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator))
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator))
        elif isinstance(m, (ChannelGate, ColumnGate)):
            for p in m.parameters():
                p.data.copy_(torch.randn(p.shape, generator=generator))


def _randomise_gates(module: nn.Module, generator: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, (ChannelGate, ColumnGate)):
            _randomise(m, generator)


def _block(cin: int, mid: int, cout: int, kernel: int, stride: int, act: str, se: int) -> InvertedResidual:
    block = InvertedResidual(cin, mid, cout, [kernel], stride, act, se, elastic=False).eval()
    _randomise(block, torch.Generator().manual_seed(1))
    return block


def _gated(block: InvertedResidual, cin: int, width: int, channel: bool = True, spatial: bool = True,
           runtime: GateRuntime | None = None) -> GatedInvertedResidual:
    gated = GatedInvertedResidual(copy.deepcopy(block), block_layout(block), cin, width, channel, spatial,
                                  runtime or GateRuntime())
    _randomise(gated.channel_gate or nn.Identity(), torch.Generator().manual_seed(2))
    _randomise(gated.column_gate or nn.Identity(), torch.Generator().manual_seed(3))
    return gated.eval()


# (in, expanded, out, kernel, stride, activation, SE channels, input width)
CASES = [
    pytest.param(16, 48, 16, 3, 1, "relu", 16, 12, id="residual-k3-se"),
    pytest.param(16, 48, 24, 5, 2, "hswish", 0, 12, id="stride2-k5"),
    pytest.param(8, 32, 16, 7, 2, "hswish", 8, 9, id="stride2-k7-se-odd-width"),
]


def test_inverted_residual_is_registered():
    block = _block(16, 48, 16, 3, 1, "relu", 16)
    assert gated_block_class(block) is GatedInvertedResidual
    assert block_layout(block).squeeze_excite == "se"


@pytest.mark.parametrize("cin, mid, cout, kernel, stride, act, se, width", CASES)
def test_full_keep_equals_ungated(cin, mid, cout, kernel, stride, act, se, width):
    block = _block(cin, mid, cout, kernel, stride, act, se)
    gated = _gated(block, cin, width)
    x = torch.randn(3, cin, width, width, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(gated(x), block(x), atol=1e-5, rtol=1e-5)
        gated.train()
        block.train()
        torch.testing.assert_close(gated(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channel, spatial", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("cin, mid, cout, kernel, stride, act, se, width", CASES)
@pytest.mark.parametrize("batch, max_share", [(1, 1.0), (4, 1.0), (4, 0.0)])
def test_skip_matches_mask(cin, mid, cout, kernel, stride, act, se, width, channel, spatial, batch, max_share):
    runtime = GateRuntime(skip_max_share=max_share)
    gated = _gated(_block(cin, mid, cout, kernel, stride, act, se), cin, width, channel, spatial, runtime)
    gated.set_keep(max(1, gated.inner_channels // 2), max(1, gated.inner_width // 2))
    x = torch.randn(batch, cin, width, width, generator=torch.Generator().manual_seed(5))
    skipped, masked = skip_and_mask_outputs(gated, x)
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)


def test_mask_path_matches_training_masks():
    # Eval "mask" (BatchNorm folded) and training (BatchNorm modules, no dropout) mask the same map.
    block = _block(16, 48, 24, 5, 2, "hswish", 16)
    runtime = GateRuntime(mode="mask")
    gated = _gated(block, 16, 12, runtime=runtime)
    gated.set_keep(20, 3)
    for m in gated.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        evaluated = gated(x)
        gated.training = True
        trained = gated(x)
    torch.testing.assert_close(trained, evaluated, atol=1e-4, rtol=1e-4)


def test_skip_never_reads_dropped_channels():
    runtime = GateRuntime(mode="skip", skip_max_share=1.0)
    gated = _gated(_block(16, 48, 16, 3, 1, "relu", 16), 16, 10, spatial=False, runtime=runtime)
    gated.set_keep(24, 10)
    x = torch.randn(1, 16, 10, 10, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = gated(x)
        logits = gated.channel_gate.logits(x.mean(dim=(2, 3)))
        kept = torch.zeros(48, dtype=torch.bool)
        kept[torch.topk(logits[0], 24).indices] = True
        # Poison every weight of the dropped channels: expand, depthwise, SE and project.
        gated.conv_pw.weight[~kept] = float("nan")
        gated.conv_dw.weight[~kept] = float("nan")
        gated.se.conv_reduce.weight[:, ~kept] = float("nan")
        gated.se.conv_expand.weight[~kept] = float("nan")
        gated.conv_pwl.weight[:, ~kept] = float("nan")
        skipped = gated(x)
    assert torch.isfinite(skipped).all()
    torch.testing.assert_close(skipped, expected, atol=1e-5, rtol=1e-5)


def test_executed_macs_known_case():
    runtime = GateRuntime(mode="skip", skip_max_share=1.0)
    gated = _gated(_block(8, 32, 16, 3, 2, "relu", 8), 8, 10, runtime=runtime)
    assert gated.inner_width == 5
    gated.set_keep(16, 2)
    with torch.no_grad():
        # Score each output column by its pooled input, so columns 1 and 3 (inputs 2-3 and 6-7) win.
        gated.column_gate.conv.weight.zero_()
        gated.column_gate.conv.weight[0, :, 1] = 1.0
        gated.column_gate.conv.bias.zero_()
    x = torch.zeros(1, 8, 10, 10)
    x[..., 2:4] = 1.0
    x[..., 6:8] = 1.0
    macs = executed_macs(gated, x)
    expand = 16 * 8 * 10 * 6  # kept channels x input channels x rows x input columns 1-3 and 5-7
    depthwise = 16 * 9 * 5 * 2  # kept channels x 3x3 taps x output rows x kept columns
    squeeze_excite = 2 * 8 * 16  # reduce and expand on the kept channels
    project = 16 * 16 * 5 * 2  # output channels x kept channels x rows x kept columns
    gates = 8 * 32 + 8 * 3 * 5  # channel gate linear + column gate 1-D convolution over 5 columns
    assert macs == expand + depthwise + squeeze_excite + project + gates
    runtime.mode = "mask"
    dense = 32 * 8 * 100 + 32 * 9 * 25 + 2 * 8 * 32 + 16 * 32 * 25
    assert executed_macs(gated, x) == dense + gates


# -- networks -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_subnet():
    config = load_space_config("mobilenet")
    config["base_widths"] = [8, 8, 8, 16, 16, 24, 32, 64, 64]
    space = create_space(config)
    torch.manual_seed(0)
    model = MobileNetV3Subnet(space, space.smallest()).eval()
    _randomise(model, torch.Generator().manual_seed(0))
    return model


def test_find_block_sites_on_mobilenet(mobilenet_subnet):
    sites = find_block_sites(mobilenet_subnet, (1, 28, 28))
    blocks = [name for name, m in mobilenet_subnet.named_modules() if isinstance(m, InvertedResidual)]
    assert [site.name for site in sites] == blocks
    first = sites[0]
    assert first.producer_path.endswith("conv_pw")
    assert first.consumer_path.endswith("conv_pwl")
    assert first.inner_size == 14  # the first elastic stage has stride 2 on the 28x28 map


def test_network_full_keep_equals_subnet(mobilenet_subnet):
    network = apply_gates(mobilenet_subnet, {**ALL, "keep_ratio": 1.0}).eval()
    _randomise_gates(network, torch.Generator().manual_seed(1))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(network(x), mobilenet_subnet(x), atol=1e-4, rtol=1e-4)


def test_network_skip_matches_mask_across_range(mobilenet_subnet):
    network = apply_gates(mobilenet_subnet, ALL).eval()
    _randomise_gates(network, torch.Generator().manual_seed(1))
    assert network.gated_blocks()
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    previous, low_end = None, None
    for ratio in (0.4, 0.6, 0.8, 1.0):
        network.set_keep_ratio(ratio)
        for name, (channels, _) in network.keep_counts().items():
            assert channels >= keep_count(ratio, network.gated_blocks()[name].inner_channels)
        with torch.no_grad():
            network.set_mode("skip")
            skipped, skip_macs = network(x), executed_macs(network, x)
            network.set_mode("mask")
            masked, mask_macs = network(x), executed_macs(network, x)
        torch.testing.assert_close(skipped, masked, atol=1e-4, rtol=1e-4)
        assert skip_macs <= mask_macs
        if previous is not None:
            assert skip_macs >= previous
        previous = skip_macs
        low_end = low_end or (skip_macs, mask_macs)
    assert low_end[0] < 0.6 * low_end[1]  # keep 0.4: skip runs under 60% of the masked network's MACs


def test_mobilenet_calibration_and_reload(mobilenet_subnet):
    network = apply_gates(mobilenet_subnet, {**ALL, "keep_ratio": 0.6})
    _randomise_gates(network, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(8, 1, 28, 28, generator=generator) for _ in range(2)]
    calibrate_keep_ratios(network, batches, max_batches=2, ratios=[0.4, 0.6, 1.0])
    reference = copy.deepcopy(mobilenet_subnet)
    with torch.no_grad():
        recalibrate_batchnorm(reference, batches, max_batches=2)
    reference.eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    network.set_keep_ratio(1.0)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(x), reference(x), atol=1e-4, rtol=1e-4)

    network.set_keep_ratio(0.6)
    rebuilt = apply_gates(mobilenet_subnet, ALL, plan=json.loads(json.dumps(network.describe())))
    rebuilt.load_state_dict(network.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), network(x))


def test_measured_placement_never_groups_inverted(mobilenet_subnet, monkeypatch):
    from nas.gates import timing
    from predictors.protocol import MeasurementProtocol

    # Force a channel gate on every block, whatever this machine measures, so the grouped timing is reached.
    monkeypatch.setattr(timing, "choose_gate_options", lambda latencies, config: {
        block: ("channel", "forced") for block in latencies})
    monkeypatch.setattr(timing, "measured_steps", lambda latency, tolerance: sorted(latency))
    config = {**ALL, "placement": "measure", "measure_batch_sizes": [1, 2], "spatial": False}
    protocol = MeasurementProtocol(device="cpu", threads=1, warmup=1, repeats=2)
    network = apply_gates(mobilenet_subnet, config, protocol=protocol)
    assert all(plan.channel for plan in network.plans)
    # Inverted blocks have no grouped path, so none is timed or recorded.
    assert all(plan.grouped_max_channels == 0 for plan in network.plans)
    assert all("grouped" not in plan.reason for plan in network.plans)


def test_inverted_blocks_profile_and_fit(mobilenet_subnet, tmp_path):
    from predictors.features import HardwareFacts
    from predictors.fingerprint import device_fingerprint
    from predictors.gated import GatedBlockLatency, block_runs, collect_blocks, profile_gated_blocks
    from predictors.protocol import MeasurementProtocol
    from predictors.store import ProfileStore

    protocol = MeasurementProtocol(threads=1, warmup=0, repeats=1)
    store = ProfileStore(tmp_path, device_fingerprint(protocol))
    blocks = collect_blocks([(mobilenet_subnet, (1, 28, 28))])[:2]
    signature = blocks[0][2]
    assert signature["type"] == "InvertedResidual"
    assert [stage["groups"] > 1 for stage in signature["stages"]] == [False, True, False]  # expand, depthwise, project
    measured = profile_gated_blocks(blocks, store, protocol, passes=1, progress=False)
    assert measured == sum(len(block_runs(b[2], 1)) for b in blocks)
    model = GatedBlockLatency.fit(store.gated_block_records(1), HardwareFacts(device="cpu", simd_width=16))
    runs = [r["run"] for r in store.gated_block_records(1) if r["block"] == signature]
    assert (model.predict([signature] * len(runs), runs) > 0).all()


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_export_column_gated_inverted(mobilenet_subnet, dynamic_batch):
    network = apply_gates(mobilenet_subnet, {"name": "feature", "placement": "all", "keep_ratio": 0.4}).eval()
    assert all(block.column_gate is not None for block in network.gated_blocks().values())
    assert_export_matches_eager(network, dynamic_batch)

"""Tests of the channel and column gates: scores, top-k, skipping, MAC counts, planning and training."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from nas.gates import (
    BatchNormCalibration,
    BlockPlan,
    ChannelGate,
    ColumnGate,
    GateConfigError,
    GatedNetwork,
    FORMAT_VERSION,
    GatedResidualBlock,
    GateRuntime,
    KeepRatioSchedule,
    apply_gates,
    calibrate_keep_ratios,
    calibration_ratios,
    describe_layers,
    executed_macs,
    find_block_sites,
    full_keep_logits,
    keep_count,
    parse_gate_config,
    top_k_mask,
)
from nas.gates.blocks import block_layout
from nas.gates.modules import straight_through, targeted_dropout_mask
from nas.gates.planning import channel_staircase, plan_blocks
from nas.gates.timing import (
    choose_gate_options,
    column_alone_pays,
    grouped_limit,
    measured_steps,
    time_channel_counts,
)
from nas.spaces.layers import LayerSpec
from nas.supernet.dynamic import recalibrate_batchnorm
from nas.supernet.resnet import BasicBlock, Bottleneck, ResNetSubnet
from predictors.protocol import MeasurementProtocol
from nas.export import export_program
from tests.conftest import assert_export_matches_eager, skip_and_mask_outputs

ROOT = Path(__file__).resolve().parent.parent

# Placements that need no timing, so tests are deterministic and quick.
ALL = {"name": "feature", "placement": "all"}
TABLE = {"name": "feature", "placement": "table"}


def _randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator))
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator))


def _randomise_gates(module: nn.Module, generator: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, (ChannelGate, ColumnGate)):
            for p in m.parameters():
                p.data.copy_(torch.randn(p.shape, generator=generator))


def _gated_block(block: nn.Module, in_channels: int, in_width: int, channel: bool = True, spatial: bool = True,
                 runtime: GateRuntime | None = None) -> GatedResidualBlock:
    generator = torch.Generator().manual_seed(1)
    _randomise_batchnorm(block, generator)
    gated = GatedResidualBlock(copy.deepcopy(block), block_layout(block), in_channels, in_width, channel, spatial,
                               runtime or GateRuntime())
    _randomise_gates(gated, generator)
    return gated.eval()


BLOCK_CASES = [
    pytest.param(BasicBlock, 16, 24, 24, 2, 14, id="basic-stride2"),
    pytest.param(BasicBlock, 24, 24, 24, 1, 14, id="basic-stride1"),
    pytest.param(BasicBlock, 8, 16, 16, 2, 7, id="basic-odd-width"),
    pytest.param(Bottleneck, 16, 8, 32, 2, 14, id="bottleneck-stride2"),
    pytest.param(Bottleneck, 32, 16, 32, 1, 7, id="bottleneck-stride1"),
]


# -- configuration ----------------------------------------------------------------------------------


def test_feature_yaml_parses_with_defaults():
    node = OmegaConf.merge(OmegaConf.create({"seed": 3}), {"gates": OmegaConf.load(ROOT / "conf/gates/feature.yaml")})
    config = parse_gate_config(OmegaConf.to_container(node.gates, resolve=True))
    assert config.name == "feature"
    assert config.keep_ratio == 0.4
    assert config.keep_ratio_range == (0.25, 1.0)
    assert config.latency_budget_ms is None
    assert config.seed == 3
    assert config.targeted_dropout.rate == 0.5


def test_none_yaml_parses_to_disabled():
    config = parse_gate_config(yaml.safe_load((ROOT / "conf/gates/none.yaml").read_text()))
    assert not config.enabled
    assert config.kd_weight == 0.0


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"name": "feature", "keep_ratios": 0.5}, "Unknown keys ['keep_ratios']"),
        ({"name": "none", "keep_ratio": 0.5}, "takes no other keys"),
        ({"name": "attention"}, "allowed names"),
        ({"name": "feature", "keep_ratio": 0.2}, "outside gates.keep_ratio_range"),
        ({"name": "feature", "keep_ratio_range": [0.9, 0.5]}, "low <= high"),
        ({"name": "feature", "mode": "fast"}, "gates.mode"),
        ({"name": "feature", "targeted_dropout": {"rate": 0.5, "p": 1}}, "gates.targeted_dropout"),
        ({"name": "feature", "channel": "yes"}, "true or false"),
        ({"name": "feature", "latency_budget_ms": -1.0}, "latency_budget_ms"),
        ({"name": "feature", "placement": "everywhere"}, "gates.placement"),
        ({"name": "feature", "measure_batch_sizes": [0]}, "gates.measure_batch_sizes"),
        ({"name": "feature", "full_keep_weight": -1.0}, "gates.full_keep_weight"),
        ({"name": "feature", "keep_ratio": "abc"}, "gates.keep_ratio must be a number in gates.keep_ratio_range"),
        ({"name": "feature", "keep_ratio": True}, "gates.keep_ratio must be a number"),
        ({"name": "feature", "keep_ratio": 1.5}, "gates.keep_ratio=1.5 is outside gates.keep_ratio_range [0.25, 1.0]; "
                                                 "keep ratios are shares of the features, in (0, 1]"),
        ({"name": "feature", "keep_ratio_range": [0.5, 0.8], "keep_ratio": 0.9}, "or widen the range"),
        ({"name": "feature", "latency_budget_ms": "fast"}, "gates.latency_budget_ms must be a positive number"),
        ({"name": "feature", "latency_budget_ms": True}, "but got True"),
        ({"name": "feature", "latency_budget_ms": float("nan")}, "gates.latency_budget_ms"),
        ({"name": "feature", "seed": "abc"}, "gates.seed must be an integer, but got 'abc'"),
        ({"name": "feature", "schedule_epochs": True}, "gates.schedule_epochs"),
        ({"name": "feature", "batch_check": "yes"}, "gates.batch_check must be true or false"),
        ({"name": "feature", "max_slowdown": "abc"}, "gates.max_slowdown must be a number in [0, 1], but got 'abc'"),
        ({"name": "feature", "min_saving": "abc"}, "gates.min_saving must be a number"),
    ],
)
def test_config_rejects_invalid(data, fragment):
    with pytest.raises(GateConfigError, match=re.escape(fragment)):
        parse_gate_config(data)


# -- scores, top-k and dropout ---------------------------------------------------------------------


def test_top_k_mask_hand_made():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.1, 0.7]])
    mask = top_k_mask(scores, 2)
    assert mask.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("ratio, total, expected", [(0.6, 40, 24), (0.6, 28, 17), (0.4, 7, 3), (1.0, 9, 9),
                                                     (0.01, 10, 1), (0.3, 10, 3)])
def test_keep_count(ratio, total, expected):
    assert keep_count(ratio, total) == expected


def test_channel_gate_scores_hand_made():
    gate = ChannelGate(in_channels=2, channels=3)
    with torch.no_grad():
        gate.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        gate.fc.bias.zero_()
    pooled = torch.tensor([[2.0, -2.0]])  # (N=1, C=2) channel means
    scores = gate(pooled)
    expected = torch.sigmoid(torch.tensor([[2.0, -2.0, 0.0]]))
    torch.testing.assert_close(scores, expected)
    assert gate.macs == 6


def test_column_gate_pools_by_stride():
    gate = ColumnGate(in_channels=1, stride=2, kernel_size=3)
    with torch.no_grad():
        gate.conv.weight.copy_(torch.tensor([[[0.0, 1.0, 0.0]]]))
        gate.conv.bias.zero_()
    rows = torch.tensor([[[0.0, 2.0, 4.0, 6.0, 8.0]]])  # W=5, stride 2 -> 3 columns: means 1, 5, 8
    scores = gate(rows)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([[1.0, 5.0, 8.0]])))
    assert gate.macs(3) == 9


def test_targeted_dropout_drops_lowest_only():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3]])
    always = targeted_dropout_mask(scores, fraction=0.5, rate=1.0, generator=torch.Generator().manual_seed(0))
    assert always.tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]
    never = targeted_dropout_mask(scores, fraction=0.5, rate=0.0, generator=None)
    assert never.tolist() == [[1.0] * 6]


def test_targeted_dropout_rate_and_seed():
    scores = torch.rand(2000, 10, generator=torch.Generator().manual_seed(0))
    first = targeted_dropout_mask(scores, 0.4, 0.5, torch.Generator().manual_seed(7))
    second = targeted_dropout_mask(scores, 0.4, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    dropped_share = 1.0 - first.mean().item()
    assert abs(dropped_share - 0.4 * 0.5) < 0.02


def test_straight_through_value_and_gradient():
    scores = torch.tensor([0.2, 0.7], requires_grad=True)
    mask = torch.tensor([0.0, 1.0])
    out = straight_through(mask, scores)
    assert out.tolist() == [0.0, 1.0]
    (out * torch.tensor([3.0, 5.0])).sum().backward()
    assert scores.grad.tolist() == [3.0, 5.0]


# -- gated blocks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block_cls, cin, mid, cout, stride, width", BLOCK_CASES)
def test_block_at_full_keep_equals_ungated(block_cls, cin, mid, cout, stride, width):
    block = block_cls(cin, mid, cout, stride).eval()
    gated = _gated_block(block, cin, width)
    _randomise_batchnorm(block, torch.Generator().manual_seed(1))
    x = torch.randn(3, cin, width, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gated(x), block(x), atol=1e-5, rtol=1e-5)
        gated.train()
        block.train()
        torch.testing.assert_close(gated(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channel, spatial", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("block_cls, cin, mid, cout, stride, width", BLOCK_CASES)
@pytest.mark.parametrize("batch, max_share", [(1, 1.0), (4, 1.0), (4, 0.0)])
def test_skip_matches_mask(block_cls, cin, mid, cout, stride, width, channel, spatial, batch, max_share):
    runtime = GateRuntime(skip_max_share=max_share)
    gated = _gated_block(block_cls(cin, mid, cout, stride), cin, width, channel, spatial, runtime)
    gated.set_keep(max(1, gated.inner_channels // 2), max(1, gated.inner_width // 2))
    x = torch.randn(batch, cin, width, width, generator=torch.Generator().manual_seed(3))
    skipped, masked = skip_and_mask_outputs(gated, x)
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_cls, cin, mid, cout, stride, width", BLOCK_CASES)
def test_grouped_path_matches_mask(block_cls, cin, mid, cout, stride, width):
    runtime = GateRuntime()
    gated = _gated_block(block_cls(cin, mid, cout, stride), cin, width, channel=True, spatial=False, runtime=runtime)
    gated.grouped_max_channels = gated.inner_channels
    gated.set_keep(max(1, gated.inner_channels // 2), gated.inner_width)
    x = torch.randn(4, cin, width, width, generator=torch.Generator().manual_seed(3))
    grouped, masked = skip_and_mask_outputs(gated, x)
    torch.testing.assert_close(grouped, masked, atol=1e-5, rtol=1e-5)
    # Each image runs only its own kept channels, so the batch costs four single images.
    assert executed_macs(gated, x) == 4 * executed_macs(gated, x[:1])
    gated.grouped_max_channels = gated.kept_channels - 1  # keeps more than the limit: masks
    runtime.skip_max_share = 0.0
    assert executed_macs(gated, x) > 4 * executed_macs(gated, x[:1])


def test_grouped_limit_rejects_invalid_value():
    gated = _gated_block(BasicBlock(8, 16, 16, 1), 8, 12, spatial=False)
    with pytest.raises(ValueError, match="grouped_max_channels must be an integer in"):
        gated.grouped_max_channels = 17


@pytest.mark.parametrize("change", ["assign_state", "replace_module"])
def test_eval_cache_follows_replaced_weights(change):
    gated = _gated_block(BasicBlock(8, 16, 16, 1), 8, 12, spatial=False)
    gated.set_keep(8, 12)
    x = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(6))
    reference = copy.deepcopy(gated)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        before = gated(x)  # fills the folded-weight cache
        if change == "assign_state":
            state = {k: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                     for k, v in gated.state_dict().items()}
            gated.load_state_dict(state, assign=True)  # new tensors: no version of the cached ones changes
        else:
            gated.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        reference.load_state_dict(gated.state_dict())
        after = gated(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference(x), atol=1e-5, rtol=1e-5)


def test_mask_zeroes_dropped_channels_and_columns():
    gated = _gated_block(BasicBlock(8, 16, 16, 1), 8, 10, runtime=GateRuntime(mode="mask")).train()
    gated.set_keep(6, 4)
    x = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(4))
    captured = {}
    gated.conv2.register_forward_pre_hook(lambda m, args: captured.setdefault("hidden", args[0].detach().clone()))
    with torch.no_grad():
        kept_channels = top_k_mask(gated.channel_gate(x.mean(dim=(2, 3))), 6).bool()
        kept_columns = top_k_mask(gated.column_gate(x.mean(dim=2)), 4).bool()
        gated(x)
    hidden = captured["hidden"]
    for image in range(2):
        assert hidden[image][~kept_channels[image]].abs().max() == 0
        assert hidden[image][:, :, ~kept_columns[image]].abs().max() == 0
        assert hidden[image][kept_channels[image]][:, :, kept_columns[image]].abs().max() > 0


def test_skip_never_reads_dropped_channels():
    runtime = GateRuntime(mode="skip", skip_max_share=1.0)
    gated = _gated_block(BasicBlock(8, 16, 16, 1), 8, 12, runtime=runtime)
    gated.set_keep(8, 6)
    x = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = gated(x)
        kept = top_k_mask(gated.channel_gate(x.mean(dim=(2, 3))), 8)[0].bool()
        # Poison the producer's filters and the consumer's inputs of the dropped channels.
        gated.conv1.weight[~kept] = float("nan")
        gated.conv2.weight[:, ~kept] = float("nan")
        skipped = gated(x)
        runtime.mode = "mask"
        masked = gated(x)
    assert torch.isfinite(skipped).all()
    torch.testing.assert_close(skipped, expected, atol=1e-5, rtol=1e-5)
    assert torch.isnan(masked).any()


def test_block_rejects_keep_counts_out_of_range():
    gated = _gated_block(BasicBlock(8, 16, 16, 1), 8, 12)
    with pytest.raises(ValueError, match="kept channels must be in"):
        gated.set_keep(17, 6)


# -- networks -----------------------------------------------------------------------------------------


@pytest.fixture
def subnet(resnet_space):
    arch = resnet_space.arch_from_choices({"resolution": 28, "depth_0": 1, "width_0": 16, "depth_1": 2, "width_1": 24,
                                           "depth_2": 1, "width_2": 32})
    torch.manual_seed(0)
    model = ResNetSubnet(resnet_space, arch).eval()
    _randomise_batchnorm(model, torch.Generator().manual_seed(0))
    return model


def test_executed_macs_ungated_equals_space(resnet_space, subnet):
    x = torch.zeros(2, 1, 28, 28)
    assert executed_macs(subnet, x) == 2 * resnet_space.macs(subnet.arch)


def test_executed_macs_gated_block_known_case():
    runtime = GateRuntime(mode="skip", skip_max_share=1.0)
    gated = _gated_block(BasicBlock(8, 16, 16, 1), 8, 10, runtime=runtime)
    gated.set_keep(4, 5)
    macs = executed_macs(gated, torch.zeros(1, 8, 10, 10))
    producer = 4 * 8 * 9 * 10 * 5  # kept channels x input channels x 3x3 x rows x kept columns
    consumer = 16 * 4 * 9 * 10 * 5  # each kept column meets all 3x3 taps of every output channel
    gates = 8 * 16 + 8 * 3 * 10  # channel gate linear + column gate 1-D convolution
    downsample = 16 * 8 * 100  # the 1x1 projection of the shortcut always runs
    assert macs == producer + consumer + gates + downsample
    runtime.mode = "mask"
    dense = 16 * 8 * 9 * 100 + 16 * 16 * 9 * 100
    assert executed_macs(gated, torch.zeros(1, 8, 10, 10)) == dense + gates + downsample


def test_apply_gates_leaves_model_unchanged(subnet):
    before = {k: v.clone() for k, v in subnet.state_dict().items()}
    network = apply_gates(subnet, ALL)
    assert isinstance(network, GatedNetwork)
    assert not any(isinstance(m, GatedResidualBlock) for m in subnet.modules())
    for key, value in subnet.state_dict().items():
        assert torch.equal(value, before[key])
    assert set(before) <= {k.removeprefix("model.") for k in network.state_dict()}


def test_network_full_keep_equals_subnet(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 1.0}).eval()
    _randomise_gates(network, torch.Generator().manual_seed(0))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(network(x), subnet(x), atol=1e-5, rtol=1e-5)


def test_network_skip_matches_mask_and_saves_macs(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.4}).eval()
    _randomise_gates(network, torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        network.set_mode("skip")
        skipped = network(x)
        skip_macs = executed_macs(network, x)
        network.set_mode("mask")
        masked = network(x)
        mask_macs = executed_macs(network, x)
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)
    assert skip_macs < 0.7 * mask_macs


def test_set_keep_ratio_across_range(subnet):
    network = apply_gates(subnet, ALL)
    previous = None
    for ratio in (0.4, 0.5, 0.6, 0.75, 0.9, 1.0):
        network.set_keep_ratio(ratio)
        assert network.keep_ratio == ratio
        counts = network.keep_counts()
        for name, (channels, columns) in counts.items():
            block = network.gated_blocks()[name]
            assert channels % 8 == 0 or channels == block.inner_channels
            assert channels >= keep_count(ratio, block.inner_channels)
            if block.column_gate is not None:
                assert columns == keep_count(ratio, block.inner_width)
            if previous is not None:
                assert channels >= previous[name][0]
                assert columns >= previous[name][1]
        previous = counts
    assert all(b.keeps_all for b in network.gated_blocks().values())
    for ratio in (0.2, 1.01, float("nan")):
        with pytest.raises(GateConfigError, match=r"gates.keep_ratio_range \[0.25, 1.0\]"):
            network.set_keep_ratio(ratio)


def test_placement_no_gate_warns(subnet, monkeypatch, caplog):
    import dataclasses

    import nas.gates.network as network_module

    placed = network_module.plan_blocks

    def nothing_pays(sites, config, table, measure=None):
        return [dataclasses.replace(p, channel=False, spatial=False, reason="no gate pays")
                for p in placed(sites, config, table, measure)]

    monkeypatch.setattr(network_module, "plan_blocks", nothing_pays)
    with caplog.at_level("WARNING", logger="nas.gates"):
        network = apply_gates(subnet, {"name": "feature", "placement": "all"})
    assert network.gated_blocks() == {}
    assert "placement=all put no gate on any of the 4 blocks" in caplog.text
    # Advice to switch to placement=all would be no help here.
    assert "a lower gates.keep_ratio_range start" in caplog.text
    assert "gates.placement=all to gate" not in caplog.text


def test_none_config_places_no_gate(subnet):
    network = apply_gates(subnet, {"name": "none"}).eval()
    assert network.gated_blocks() == {}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(network(x), subnet(x))
    assert network.auxiliary_loss().item() == 0.0


def test_describe_rebuilds_same_gates(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.5}).eval()
    _randomise_gates(network, torch.Generator().manual_seed(0))
    record = json.loads(json.dumps(network.describe()))
    assert record["format_version"] == FORMAT_VERSION == 4
    assert record["batchnorm_stats"] is None
    rebuilt = apply_gates(subnet, ALL, plan=record).eval()
    rebuilt.load_state_dict(network.state_dict())
    assert rebuilt.keep_ratio == 0.5
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), network(x))
    with pytest.raises(GateConfigError, match="format_version"):
        apply_gates(subnet, ALL, plan={**record, "format_version": 99})


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_export_matches_eager(subnet, dynamic_batch):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.4}).eval()
    _randomise_gates(network, torch.Generator().manual_seed(0))
    assert_export_matches_eager(network, dynamic_batch)


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_export_program_of_gated_network_is_lean(subnet, tmp_path, dynamic_batch):
    network = apply_gates(subnet, {**ALL, "spatial": False, "keep_ratio": 0.4}).eval()
    _randomise_gates(network, torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 28, 28)

    program = export_program(network, x, tmp_path / "gated.pt2", dynamic_batch=dynamic_batch)

    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    # Folding BatchNorm and scaling the gate's weights happen before the trace, not on every call.
    assert "aten.div.Tensor" not in targets
    assert "aten.sqrt.default" not in targets
    assert targets.count("aten.topk.default") == len(network.gated_blocks())
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), network(x), atol=1e-4, rtol=1e-4)


def test_export_leaves_eager_cache_untraced(subnet):
    network = apply_gates(subnet, {**ALL, "spatial": False, "keep_ratio": 0.4}).eval()
    _randomise_gates(network, torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        network(x)  # fills the caches at keep 0.4
        network.set_keep_ratio(0.6)
        torch.export.export(network, (x,))  # traces keep 0.6 without an eager pass first
        skipped, masked = skip_and_mask_outputs(network, x)
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)


# -- planning from profiles ------------------------------------------------------------------------


def test_block_plan_from_older_record_never_groups():
    plan = BlockPlan("layer1.0", True, False, [8, 16], "test")
    data = plan.to_dict()
    del data["grouped_max_channels"]
    assert BlockPlan.from_dict(data).grouped_max_channels == 0
    with pytest.raises(GateConfigError, match="grouped_max_channels must be"):
        BlockPlan.from_dict({**data, "grouped_max_channels": -1})


def test_describe_layers_matches_space(resnet_space):
    for arch in (resnet_space.largest(), resnet_space.smallest()):
        model = ResNetSubnet(resnet_space, arch)
        described = sorted(layer.key() for _, layer in describe_layers(model, resnet_space.input_shape(arch)))
        assert described == sorted(layer.key() for layer in resnet_space.layers(arch))


def _staircase_table(subnet, step: int, flat_at: int | None = None) -> dict[str, float]:
    """Latency in steps of ``step`` channels: time grows with ceil(channels / step); flat on ``flat_at``-wide maps."""
    table = {}
    for path, layer in describe_layers(subnet, (1, 28, 28)):
        table[layer.key()] = 0.01
    for site in find_block_sites(subnet, (1, 28, 28)):
        for channels in range(1, site.inner_channels + 1):
            cost = 0.1 if site.inner_size == flat_at else 0.1 * math.ceil(channels / step)
            for layer in site.gated_layers(channels):
                table[layer.key()] = cost
    return table


def test_measured_placement_ignores_table_steps(subnet):
    sites = find_block_sites(subnet, (1, 28, 28))
    seen = []

    def measure(measured_sites, steps):
        seen.extend(steps)
        return [(False, False, 0, list(s), {}, "not gated", {}, None) for s in steps]

    # A table that is flat over all counts would leave one step per block: all channels.
    plan_blocks(sites, parse_gate_config({**ALL, "placement": "measure"}), _staircase_table(subnet, step=999), measure)
    assert seen == [[*range(8, site.inner_channels, 8), site.inner_channels] for site in sites]


@pytest.mark.parametrize(("settings", "reason"), [
    ({"name": "none"}, "gates.name=none"),
    ({**ALL, "channel": False, "spatial": False}, "gates.channel and gates.spatial are both false"),
])
def test_plan_names_why_no_gate(subnet, settings, reason):
    plans = plan_blocks(find_block_sites(subnet, (1, 28, 28)), parse_gate_config(settings), None)
    assert {plan.reason for plan in plans} == {reason}
    assert not any(plan.channel or plan.spatial for plan in plans)


def test_staircase_snaps_to_step_tops(subnet):
    site = find_block_sites(subnet, (1, 28, 28))[1]  # layer2.0: 16 -> 24 channels at 14x14
    steps, latency = channel_staircase(site, _staircase_table(subnet, step=16), tolerance=0.05)
    assert steps == [16, 24]
    assert latency[16] < latency[24]


def test_staircase_needs_several_counts(subnet):
    site = find_block_sites(subnet, (1, 28, 28))[1]
    only_full = {layer.key(): 0.1 for layer in site.gated_layers(site.inner_channels)}
    assert channel_staircase(site, only_full, tolerance=0.05) == ([], {})
    # The plan then rounds to multiples of 8 channels, as without a table.
    plans = plan_blocks([site], parse_gate_config(TABLE), only_full)
    assert plans[0].channel_steps == [8, 16, 24]


def test_plan_skips_flat_staircase(subnet, caplog):
    sites = find_block_sites(subnet, (1, 28, 28))
    table = _staircase_table(subnet, step=8, flat_at=7)
    config = parse_gate_config(TABLE)
    with caplog.at_level(logging.INFO, logger="nas.gates.planning"):
        plans = plan_blocks(sites, config, table)
    by_name = {plan.name: plan for plan in plans}
    assert by_name["layer1.0"].channel
    assert not by_name["layer3.0"].channel
    assert by_name["layer3.0"].channel_steps == [32]
    assert "rounds up to all 32 channels" in by_name["layer3.0"].reason
    assert not by_name["layer3.0"].spatial
    assert "layer3.0: no channel gate" in caplog.text


def test_plan_skips_small_saving(subnet):
    sites = find_block_sites(subnet, (1, 28, 28))
    config = parse_gate_config({**TABLE, "min_saving": 0.4, "keep_ratio": 0.6, "keep_ratio_range": [0.4, 1.0]})
    plans = {plan.name: plan for plan in plan_blocks(sites, config, _staircase_table(subnet, step=8))}
    assert plans["layer1.0"].channel  # 8 of 16 channels: 50% predicted saving
    assert not plans["layer2.0"].channel  # 16 of 24 channels: 33% predicted saving
    assert "below min_saving 40%" in plans["layer2.0"].reason


def test_apply_gates_snaps_to_table_steps(subnet):
    network = apply_gates(subnet, {**TABLE, "keep_ratio": 0.6}, _staircase_table(subnet, step=16))
    counts = network.keep_counts()
    assert counts["layer1.0"][0] == 16  # 16 channels: 0.6 * 16 = 10 rounds up to the 16-channel step
    assert counts["layer2.0"][0] == 16  # 0.6 * 24 = 15 rounds up to the step ending at 16


def test_choose_gate_options_hand_made():
    config = parse_gate_config({"name": "feature", "min_saving": 0.1, "max_slowdown": 0.05})
    latency = {
        "none": {1: 1.00, 32: 10.0},
        "channel": {1: 0.80, 32: 10.4},  # pays: 20% faster at batch 1, 4% slower at batch 32
        "column": {1: 0.70, 32: 11.0},  # fastest at batch 1 but 10% slower at batch 32
        "channel+column": {1: 0.95, 32: 9.0},  # only 5% faster at batch 1
    }
    # Alone, the block's budget at batch 32 is 0.5 ms: column (+1.0) is over it, channel (+0.4) is not.
    option, reason = choose_gate_options({"a": latency}, config)["a"]
    assert option == "channel"
    assert "channel 0.800/10.400" in reason
    assert choose_gate_options({"a": {**latency, "channel": {1: 0.80, 32: 10.6}}}, config)["a"][0] == "none"

    # A second block that gets faster at batch 32 leaves room in the shared budget for column on the first.
    faster = {"none": {1: 2.0, 32: 20.0}, "channel": {1: 1.5, 32: 15.0}}
    decisions = choose_gate_options({"a": latency, "b": faster}, config)
    assert decisions["a"][0] == "column"
    assert decisions["b"][0] == "channel"

    # The shared budget is 1.5 ms at batch 32: b's gate alone (+1.6 ms) is over it, a's column (+1.0) is not.
    slow = {"none": {1: 2.0, 32: 20.0}, "channel": {1: 1.0, 32: 21.6}}
    decisions = choose_gate_options({"a": latency, "b": slow}, config)
    assert decisions["a"][0] == "column"
    assert decisions["b"][0] == "none"
    assert "past max_slowdown 5%" in decisions["b"][1]
    assert decisions == choose_gate_options({"b": slow, "a": latency}, config)


def test_grouped_limit_hand_made():
    assert grouped_limit({8: 1.0, 16: 2.0, 24: 3.5, 32: 2.5}, 3.0) == 16  # stops at the first slower count
    assert grouped_limit({8: 4.0}, 3.0) == 0


def test_measured_steps_hand_made():
    # 16 costs what 8 costs, so 8 rounds up to 16; 24 is slower than keeping all 32, so it rounds up too.
    latency = {8: 1.0, 16: 1.02, 24: 1.5, 32: 1.4}
    assert measured_steps(latency, 0.05) == [16, 32]
    assert measured_steps({8: 1.0, 16: 2.0, 24: 3.0}, 0.05) == [8, 16, 24]


def test_measured_placement_records_times(subnet, caplog):
    config = {**ALL, "placement": "measure", "measure_batch_sizes": [1], "spatial": False}
    protocol = MeasurementProtocol(device="cpu", threads=1, warmup=1, repeats=3)
    with caplog.at_level(logging.INFO, logger="nas.gates.planning"):
        network = apply_gates(subnet, config, protocol=protocol)
    for plan in network.plans:
        assert set(plan.measured_ms) == {"none", "channel"}
        assert all(ms > 0 for times in plan.measured_ms.values() for ms in times.values())
        assert plan.spatial is False
        if plan.channel:  # counts were timed, and the steps are the measured ones
            assert plan.channel_steps == measured_steps(plan.latency_ms, 0.05)
    assert "ms at batch 1:" in caplog.text


def test_grouped_limit_timed_and_rebuilt(subnet):
    config = parse_gate_config({**ALL, "spatial": False})
    site = find_block_sites(subnet, (1, 28, 28))[0]  # layer1.0: 16 channels
    protocol = MeasurementProtocol(device="cpu", threads=1, warmup=1, repeats=2)
    times = time_channel_counts(subnet.get_submodule(site.name), site, [8, 16], config, protocol, 4, grouped=True)
    assert set(times) == {8, 16} and all(ms > 0 for ms in times.values())
    record = apply_gates(subnet, {**ALL, "spatial": False}).describe()
    record["blocks"][0]["grouped_max_channels"] = 8
    rebuilt = apply_gates(subnet, {**ALL, "spatial": False}, plan=record)
    assert rebuilt.gated_blocks()[site.name].grouped_max_channels == 8
    assert rebuilt.describe()["blocks"][0]["grouped_max_channels"] == 8


def test_measured_placement_skips_gates_that_keep_all(subnet):
    from nas.gates.timing import make_block_timer

    config = parse_gate_config({**ALL, "placement": "measure", "measure_batch_sizes": [1]})
    protocol = MeasurementProtocol(device="cpu", threads=1, warmup=1, repeats=2)
    site = find_block_sites(subnet, (1, 28, 28))[0]  # layer1.0: 16 channels, 28 columns
    timer = make_block_timer(config, protocol)
    # One step of all 16 channels: a channel gate would keep everything, a column gate still drops.
    latency = timer(subnet.get_submodule(site.name), site, [site.inner_channels])
    assert set(latency) == {"none", "column"}


# -- training --------------------------------------------------------------------------------------


def test_training_step_with_targeted_dropout(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.5,
                                   "targeted_dropout": {"fraction": 0.5, "rate": 0.5}}).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    gate = network.gated_blocks()["layer1.0"].channel_gate
    before = gate.fc.weight.detach().clone()

    loss = nn.functional.cross_entropy(network(x), y) + network.auxiliary_loss()
    loss.backward()
    assert gate.fc.weight.grad is not None and gate.fc.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(gate.fc.weight, before)
    assert torch.isfinite(loss)


def test_full_keep_logits_restore_ratio(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.5}).train()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    full = full_keep_logits(network, x)
    assert network.keep_ratio == 0.5
    assert network.keep_counts()["layer1.0"][0] == 8
    network.set_keep_ratio(1.0)
    # Training mode normalises by the batch's statistics, so the same input gives the same logits.
    torch.testing.assert_close(full, network(x))
    assert full_keep_logits(network, x) is None  # already at the top of the range


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_finetune_step_adds_full_keep_loss(subnet):
    from nas.training import FinetuneModule

    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.5}).train()
    batch = (torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10)
    losses = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        losses.append(FinetuneModule(network, full_keep_weight=weight).training_step(batch, 0).item())
    assert losses[1] > losses[0]
    assert network.keep_ratio == 0.5


def test_keep_ratio_schedule_values():
    schedule = KeepRatioSchedule(target=0.6, epochs=4)
    assert schedule.ratio_at(0) == 1.0
    assert schedule.ratio_at(2) == pytest.approx(0.8)
    assert schedule.ratio_at(10) == pytest.approx(0.6)
    assert schedule.next_ratio(10) == pytest.approx(0.6)
    assert KeepRatioSchedule(target=0.6, epochs=0).ratio_at(0) == 0.6


def test_keep_ratio_schedule_samples_range():
    schedule = KeepRatioSchedule(target=0.6, epochs=2, sample_range=(0.4, 1.0), seed=3)
    assert schedule.next_ratio(1.0) == pytest.approx(0.8)
    draws = [schedule.next_ratio(2.5) for _ in range(200)]
    assert min(draws) >= 0.4
    assert max(draws) <= 1.0
    assert max(draws) - min(draws) > 0.5

    restored = KeepRatioSchedule(target=0.9, epochs=1, sample_range=(0.5, 0.6))
    restored.load_state_dict(schedule.state_dict())
    assert [restored.next_ratio(3) for _ in range(5)] == [schedule.next_ratio(3) for _ in range(5)]


class _TinyModule(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.model.keep_ratio)
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_on_random_images(module: pl.LightningModule, images: int, epochs: int, callbacks: list) -> None:
    """Train ``module`` on ``images`` seeded random 1x28x28 images with labels, in batches of 4."""
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(images, 1, 28, 28, generator=generator),
                                          torch.randint(0, 10, (images,), generator=generator))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))


def test_keep_ratio_schedule_in_trainer(subnet):
    config = {**ALL, "keep_ratio": 0.5, "schedule_epochs": 1}
    network = apply_gates(subnet, config).train()
    module = _TinyModule(network)
    _fit_on_random_images(module, images=16, epochs=2, callbacks=[KeepRatioSchedule.from_config(config)])
    assert module.seen[:4] == pytest.approx([1.0, 0.875, 0.75, 0.625])
    assert all(0.25 <= ratio <= 1.0 for ratio in module.seen[4:])
    assert len(set(module.seen[4:])) == 4
    assert network.keep_ratio == 0.5


# -- per-keep-ratio BatchNorm statistics -------------------------------------------------------------


def _calibration_batches(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(8, 1, 28, 28, generator=generator) * 2 + 0.5 for _ in range(count)]


def test_calibration_ratios_cover_range():
    config = parse_gate_config({"name": "feature", "keep_ratio": 0.65, "keep_ratio_range": [0.4, 1.0]})
    assert calibration_ratios(config) == [0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0]


def test_calibrated_full_keep_equals_calibrated_subnet(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.5})
    _randomise_gates(network, torch.Generator().manual_seed(0))
    batches = _calibration_batches()
    calibrate_keep_ratios(network, batches, max_batches=3)
    reference = copy.deepcopy(subnet)
    with torch.no_grad():
        recalibrate_batchnorm(reference, batches, max_batches=3)
    network.set_keep_ratio(1.0)
    reference.eval()
    network.eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(network(x), reference(x), atol=1e-5, rtol=1e-5)


def test_calibrated_stats_switch_with_ratio(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.5})
    _randomise_gates(network, torch.Generator().manual_seed(0))
    bank = calibrate_keep_ratios(network, _calibration_batches(), max_batches=3, ratios=[0.4, 0.7, 1.0])
    assert bank.grid == [0.4, 0.7, 1.0]
    assert network.keep_ratio == 0.5
    # The first gated block's consumer BatchNorm reads the gated map, the stem BatchNorm does not.
    assert "layer1.0.bn2" in bank.paths
    assert "bn1" not in bank.paths
    assert "layer1.0.bn1" not in bank.paths
    consumer = network.model.get_submodule("layer1.0.bn2")
    row = bank.paths.index("layer1.0.bn2")
    for ratio, index in ((0.4, 0), (0.5, 0), (0.6, 1), (0.84, 1), (0.86, 2), (1.0, 2)):
        network.set_keep_ratio(ratio)
        assert torch.equal(consumer.running_var, bank.stats[row].running_var[index]), ratio
    assert not torch.equal(bank.stats[row].running_var[0], bank.stats[row].running_var[2])


def test_calibrated_stats_survive_reload(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.6})
    _randomise_gates(network, torch.Generator().manual_seed(0))
    calibrate_keep_ratios(network, _calibration_batches(), max_batches=2, ratios=[0.4, 0.6, 1.0])
    record = json.loads(json.dumps(network.describe()))
    assert record["batchnorm_stats"]["ratios"] == [0.4, 0.6, 1.0]
    rebuilt = apply_gates(subnet, ALL, plan=record)
    rebuilt.load_state_dict(network.state_dict())
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    network.eval()
    rebuilt.eval()
    for ratio in (1.0, 0.4, 0.6):
        network.set_keep_ratio(ratio)
        rebuilt.set_keep_ratio(ratio)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), network(x))


def test_calibration_rejects_ratio_outside_range(subnet):
    network = apply_gates(subnet, ALL)
    with pytest.raises(GateConfigError, match="outside gates.keep_ratio_range"):
        calibrate_keep_ratios(network, _calibration_batches(), max_batches=1, ratios=[0.2, 1.0])


def test_folded_network_rejects_ratio_switch(subnet):
    from predictors.modules import fold_batchnorm

    network = apply_gates(subnet, ALL)
    calibrate_keep_ratios(network, _calibration_batches(), max_batches=1, ratios=[0.4, 1.0])
    folded = copy.deepcopy(network).eval()
    fold_batchnorm(folded)
    counts = {name: (block.kept_channels, block.kept_columns) for name, block in folded.gated_blocks().items()}
    with pytest.raises(GateConfigError, match="Set the keep ratio before folding"):
        folded.set_keep_ratio(1.0)
    # The failed switch leaves the network as it was.
    assert folded.keep_ratio == network.keep_ratio
    assert {name: (block.kept_channels, block.kept_columns) for name, block in folded.gated_blocks().items()} == counts


def test_bank_ties_go_to_larger_ratio():
    import numpy as np

    from nas.gates.batchnorm import BatchNormBank

    grid = [0.25 + 0.1 * i for i in range(8)] + [1.0]  # 0.25, 0.35, ..., 0.95 with float error
    bank = BatchNormBank(["bn"], [4], grid)
    for ratio, expected in ((0.3, 0.35), (0.5, 0.55), (0.6, 0.65), (0.7, 0.75), (0.8, 0.85), (0.9, 0.95)):
        assert grid[bank.nearest(ratio)] == pytest.approx(expected), ratio
    # The same with float32 copies of the grid, as a network converted to float32 has them.
    single = BatchNormBank(["bn"], [4], [float(np.float32(r)) for r in grid])
    for ratio, expected in ((0.5, 0.55), (0.7, 0.75)):
        assert single.grid[single.nearest(ratio)] == pytest.approx(expected), ratio


def test_calibration_callback_after_fit(subnet):
    config = {**ALL, "keep_ratio": 0.5, "schedule_epochs": 0}
    network = apply_gates(subnet, config).train()
    _fit_on_random_images(_TinyModule(network), images=8, epochs=1,
                          callbacks=[KeepRatioSchedule.from_config(config),
                                     BatchNormCalibration(images=8, ratios=[0.4, 1.0])])
    assert network.batchnorm_bank is not None
    assert network.batchnorm_bank.grid == [0.4, 1.0]
    assert network.keep_ratio == 0.5
    assert network.describe()["batchnorm_stats"]["paths"] == network.batchnorm_bank.paths


class _ValidatedModule(_TinyModule):
    """Records one gated BatchNorm's statistics at the end of each training batch, at the start of
    the next one, and during validation."""

    def __init__(self, model: nn.Module, norm: nn.BatchNorm2d) -> None:
        super().__init__(model)
        self.norm = norm
        self.after_batch: list[torch.Tensor] = []
        self.before_batch: list[torch.Tensor] = []
        self.in_validation: list[torch.Tensor] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.before_batch.append(self.norm.running_mean.clone())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after_batch.append(self.norm.running_mean.clone())

    def validation_step(self, batch, batch_idx):
        self.in_validation.append(self.norm.running_mean.clone())


def test_calibration_callback_validation_statistics(subnet):
    config = {**ALL, "keep_ratio": 0.5, "schedule_epochs": 0, "sample_range_after_ramp": False}
    network = apply_gates(subnet, config).train()
    norm = network.get_submodule("model.layer1.0.bn2")
    module = _ValidatedModule(network, norm)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28, generator=generator),
                                          torch.randint(0, 10, (8,), generator=generator))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                         callbacks=[KeepRatioSchedule.from_config(config),
                                    BatchNormCalibration(images=8, ratios=[0.5, 1.0])])
    trainer.fit(module, loader, loader)
    # Training resumes from its own statistics, not from the calibrated ones: the batch after the
    # first validation starts where the last batch before it ended.
    torch.testing.assert_close(module.before_batch[1], module.after_batch[0])
    assert not torch.allclose(module.in_validation[0], module.after_batch[0])
    # The last validation saw what calibrating the final weights at keep ratio 0.5 on the same
    # 8 images, in one batch, gives.
    bank = network.batchnorm_bank
    row = bank.stats[bank.paths.index("layer1.0.bn2")]
    torch.testing.assert_close(module.in_validation[-1], row.running_mean[bank.grid.index(0.5)])


class _NoisyDigits(torch.utils.data.Dataset):
    """Eight images per class, sorted by class like a folder dataset; each read draws from torch's
    global generator like an augmentation."""

    def __init__(self) -> None:
        self.images = torch.randn(80, 1, 28, 28, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index] + 0.01 * torch.rand(1), index // 8


def test_validation_calibration_images_and_state(subnet):
    from types import SimpleNamespace

    from nas.gates.batchnorm import batchnorm_layers
    from nas.gates.training import _calibration_loader

    dataset = _NoisyDigits()
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    labels = torch.cat([y for _, y in _calibration_loader(loader, dataset, images=16, batch_size=8)])
    assert len(labels) == 16
    assert len(set(labels.tolist())) >= 5  # the first 16 would be two classes

    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.5}).eval()
    norms = batchnorm_layers(network.model)
    before = {name: (n.running_mean.clone(), n.num_batches_tracked.clone(), n.momentum) for name, n in norms.items()}
    dropout = network.runtime.dropout_rate
    callback = BatchNormCalibration(images=16)
    trainer = SimpleNamespace(train_dataloader=loader)
    generator_state = torch.get_rng_state()
    callback.on_validation_epoch_start(trainer, network)
    assert torch.equal(torch.get_rng_state(), generator_state)
    assert not network.training
    assert network.keep_ratio == 0.5
    assert network.runtime.dropout_rate == dropout
    assert not torch.equal(norms["layer1.0.bn2"].running_mean, before["layer1.0.bn2"][0])
    # A validation that fails half-way still gets the training statistics back.
    callback.on_exception(trainer, network, RuntimeError("validation failed"))
    for name, norm in norms.items():
        mean, tracked, momentum = before[name]
        torch.testing.assert_close(norm.running_mean, mean)
        assert torch.equal(norm.num_batches_tracked, tracked)
        assert norm.momentum == momentum
    callback.on_validation_epoch_end(trainer, network)  # nothing stale left to write back
    torch.testing.assert_close(norms["layer1.0.bn2"].running_mean, before["layer1.0.bn2"][0])


def test_folded_weight_cache_follows_module_conversion(subnet):
    from predictors.modules import fold_batchnorm

    # Without BatchNorm buffers, whose ids change on conversion, only the Parameters' storage shows it.
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.6}).eval()
    fold_batchnorm(network)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = network(x)  # fills the folded-weight cache in float32
        network.double()  # new storage under the same Parameter objects
        converted = network(x.double())
    assert converted.dtype == torch.float64
    torch.testing.assert_close(converted.float(), expected, rtol=1e-4, atol=1e-4)


def test_column_alone_pays_only_within_budget():
    config = parse_gate_config({"name": "feature", "min_saving": 0.05})
    latency = {"none": {1: 1.0, 32: 10.0}, "channel+column": {1: 0.8, 32: 10.3}, "column": {1: 0.9, 32: 10.2}}
    assert column_alone_pays(latency, "channel+column", config)
    # Slower than no gate at batch 1: it does not pay.
    assert not column_alone_pays({**latency, "column": {1: 1.2, 32: 10.2}}, "channel+column", config)
    # Saves at batch 1 but costs more at batch 32 than the budget admitted for channel+column.
    assert not column_alone_pays({**latency, "column": {1: 0.9, 32: 10.4}}, "channel+column", config)
    # A block without a column option.
    assert not column_alone_pays({"none": latency["none"], "channel": {1: 0.8, 32: 10.0}}, "channel", config)


def test_keep_ratio_accepts_numpy_and_tensor(subnet):
    import numpy as np

    network = apply_gates(subnet, ALL)
    network.set_keep_ratio(np.float32(0.5))
    assert network.keep_ratio == 0.5
    network.set_keep_ratio(torch.tensor(0.4))
    assert network.keep_ratio == pytest.approx(0.4)
    with pytest.raises(GateConfigError, match="must be a number"):
        network.set_keep_ratio(True)


def test_straight_through_forward_is_exact_mask():
    from nas.gates.modules import straight_through

    scores = torch.rand(1000, requires_grad=True)
    mask = (torch.rand(1000) > 0.5).float()
    out = straight_through(mask, scores)
    assert torch.equal(out, mask)
    out.sum().backward()
    assert torch.equal(scores.grad, torch.ones(1000))


def test_measured_placement_drops_useless_gate(subnet, monkeypatch):
    import nas.gates.timing as timing
    from nas.gates.planning import default_channel_steps

    def fake_block_timer(config, protocol):
        def time_block(block, site, steps):
            return {"none": {1: 1.0}, "channel": {1: 0.5}}

        return time_block

    def fake_channel_counts(block, site, counts, *args, **kwargs):
        if site.inner_channels == 32:
            return {8: 1.0, 16: 1.5, 24: 1.5, 32: 1.2}
        return {count: count / 8 for count in counts}

    # Keep ratio 0.5 requests 16 of layer3.0's 32 channels. The measured steps are 8 and 32 (16 and
    # 24 are no faster than all 32), so 16 rounds up to 32 and the gate would never drop a channel.
    config = parse_gate_config({**ALL, "placement": "measure", "measure_batch_sizes": [1], "spatial": False,
                                "keep_ratio": 0.5, "keep_ratio_range": [0.5, 1.0]})
    monkeypatch.setattr(timing, "make_block_timer", fake_block_timer)
    monkeypatch.setattr(timing, "time_channel_counts", fake_channel_counts)
    sites = find_block_sites(subnet, (1, 28, 28))
    place = timing.make_measured_placement(subnet, config, MeasurementProtocol(device="cpu", warmup=1, repeats=1))
    results = place(sites, [default_channel_steps(site.inner_channels) for site in sites])
    decisions = {site.name: result for site, result in zip(sites, results)}

    channel, _, _, steps, _, reason, _, _ = decisions["layer3.0"]
    assert channel is False, (steps, reason)
    assert "rounds up to all 32 channels" in reason
    # 8 of layer1.0's 16 channels at keep 0.5 is a measured step, so that gate stays.
    assert decisions["layer1.0"][0] is True


def test_warns_when_keep_ratio_drops_nothing(subnet, caplog):
    # Without a profile table, kept counts round up to multiples of 8: at keep 0.9 the 16, 24 and 32
    # channels of the blocks round up to all of them. 24 of 32 channels is kept up to keep 0.75.
    config = {**ALL, "spatial": False, "keep_ratio": 0.9, "keep_ratio_range": [0.25, 1.0]}
    with caplog.at_level(logging.WARNING, logger="nas.gates"):
        network = apply_gates(subnet, config, input_shape=(1, 28, 28))
    assert network.gated_blocks()
    assert network.highest_dropping_ratio() == 0.75
    assert "The highest ratio at which a gate drops something is 0.75" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas.gates"):
        apply_gates(subnet, {**config, "keep_ratio": 0.75}, input_shape=(1, 28, 28))
    assert "drops something" not in caplog.text


def test_count_times_shortened_when_many():
    from nas.gates.timing import format_count_times

    few = {8: 0.1, 16: 0.1, 24: 0.2}
    assert format_count_times(few, [16, 24]) == "8: 0.100, 16: 0.100, 24: 0.200"
    many = {count: count / 1000 for count in range(8, 680, 8)}
    text = format_count_times(many, [8, 64, 672])
    assert text.startswith("8: 0.008, 64: 0.064, 672: 0.672; 84 counts timed")


def test_keep_all_warning_skips_full_keep(subnet, caplog):
    # At keep ratio 1.0 no gate can drop anything, so there is no rounding to warn about.
    config = {**ALL, "spatial": False, "keep_ratio": 1.0, "keep_ratio_range": [0.25, 1.0]}
    with caplog.at_level(logging.WARNING, logger="nas.gates"):
        network = apply_gates(subnet, config, input_shape=(1, 28, 28))
    assert "keeps all its channels" not in caplog.text

    # A record rebuilt with plan= keeps the ratio it was saved at.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas.gates"):
        apply_gates(subnet, network.describe()["config"], input_shape=(1, 28, 28), plan=network.describe())
    assert "keeps all its channels" not in caplog.text


def test_dropped_gate_keeps_count_times(subnet, monkeypatch):
    import nas.gates.timing as timing

    def fake_block_timer(config, protocol):
        return lambda block, site, steps: {"none": {1: 1.0}, "channel": {1: 0.5}}

    def fake_channel_counts(block, site, counts, *args, **kwargs):
        if site.inner_channels == 32:
            return {8: 1.0, 16: 1.5, 24: 1.5, 32: 1.2}
        return {count: count / 8 for count in counts}

    monkeypatch.setattr(timing, "make_block_timer", fake_block_timer)
    monkeypatch.setattr(timing, "time_channel_counts", fake_channel_counts)
    config = {**ALL, "placement": "measure", "measure_batch_sizes": [1], "spatial": False, "keep_ratio": 0.5,
              "keep_ratio_range": [0.5, 1.0]}
    network = apply_gates(subnet, config, input_shape=(1, 28, 28),
                          protocol=MeasurementProtocol(device="cpu", warmup=1, repeats=1))
    blocks = {block["name"]: block for block in network.describe()["blocks"]}
    # The placement log cites these times for layer3.0, whose gate was dropped, so the record keeps them.
    assert blocks["layer3.0"]["channel"] is False
    assert blocks["layer3.0"]["latency_ms"] == {"8": 1.0, "16": 1.5, "24": 1.5, "32": 1.2}


def test_keep_all_warning_skips_saved_record(subnet, caplog):
    # A record saved at keep 0.9, where every block keeps everything, rebuilds without the warning.
    config = {**ALL, "spatial": False, "keep_ratio": 0.9, "keep_ratio_range": [0.25, 1.0]}
    record = apply_gates(subnet, config, input_shape=(1, 28, 28)).describe()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas.gates"):
        rebuilt = apply_gates(subnet, record["config"], input_shape=(1, 28, 28), plan=record)
    assert rebuilt.keep_ratio == 0.9
    assert "keeps all its channels" not in caplog.text

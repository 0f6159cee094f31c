"""Tests of the per-batch path choice of channel-gated blocks: the cost table, the runtime and placement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nas.gates import BatchPathCosts, BlockPlan, GateConfigError, GatedResidualBlock, GateRuntime, apply_gates
from nas.gates.blocks import block_layout
from nas.gates.config import parse_gate_config
from nas.gates.planning import find_block_sites
from nas.gates.budget import gated_runs
from nas.gates.timing import batch_path_modules, time_batch_paths
from nas.supernet.resnet import BasicBlock
from predictors.protocol import MeasurementProtocol
from tests.conftest import skip_and_mask_outputs

ALL = {"name": "feature", "placement": "all", "spatial": False}


def _costs(grouped: dict[int, float], gathered: dict[int, float]) -> BatchPathCosts:
    return BatchPathCosts(8, grouped, gathered)


# -- the cost table --------------------------------------------------------------------------------


def test_choose_hand_made():
    costs = _costs({8: 1.0, 16: 2.5}, {8: 0.8, 16: 1.5, 24: 2.0, 32: 3.0})
    assert costs.channels == 32
    assert costs.choose(8, 8) == "gathered"  # gathering 8 (0.8) beats grouping 8 (1.0)
    assert costs.choose(8, 16) == "grouped"  # a union of 16 costs 1.5
    assert costs.choose(8, 12) == "grouped"  # 12 costs what the next measured width, 16, costs
    assert costs.choose(16, 20) == "gathered"  # grouping 16 (2.5) loses to gathering 24 (2.0)
    assert costs.choose(16, 30) == "grouped"  # 30 costs what all 32 cost (3.0)
    assert costs.choose(12, 32) == "grouped"  # 12 kept costs what 16 kept costs: 2.5 < 3.0
    assert costs.choose(24, 28) == "dense"  # no grouped time at or above 24; 28 rounds up to all 32
    assert costs.choose(24, 24) == "gathered"
    assert _costs({8: 4.0}, {8: 0.8, 32: 3.0}).choose(8, 20) == "dense"  # 20 rounds up to all 32
    # gathering 24 was measured slower than dense, so a union of 24 runs dense, unless grouping beats both
    slow_gather = _costs({8: 3.5, 16: 2.5}, {8: 0.8, 16: 1.5, 24: 3.2, 32: 3.0})
    assert slow_gather.choose(8, 24) == "dense"
    assert slow_gather.choose(16, 24) == "grouped"


def test_always_grouped_hand_made():
    costs = _costs({8: 0.5, 16: 2.5}, {8: 0.8, 16: 1.5, 24: 2.0, 32: 3.0})
    assert costs.always_grouped(8)  # 0.5 beats gathering any union of at least 8 (0.8 and up)
    assert not costs.always_grouped(16)  # a union of 16 gathers in 1.5
    assert not costs.always_grouped(24)  # no grouped time
    for union in (8, 16, 24, 32):
        assert costs.choose(8, union) == "grouped"


def test_costs_round_trip_and_validation():
    costs = _costs({8: 1.0}, {"16": 2.0, 8: 1.5})
    assert list(costs.gathered) == [8, 16]  # sorted, keys as integers
    assert BatchPathCosts.from_dict(costs.to_dict()) == costs
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"):
        BatchPathCosts(1, {}, {8: 1.0})
    with pytest.raises(ValueError, match="at least the dense path"):
        BatchPathCosts(8, {8: 1.0}, {})
    with pytest.raises(ValueError, match="finite milliseconds > 0"):
        BatchPathCosts(8, {8: -1.0}, {16: 1.0})
    with pytest.raises(ValueError, match="finite milliseconds > 0"):
        BatchPathCosts(8, {}, {8.5: 1.0})
    with pytest.raises(ValueError, match="must map channel counts"):
        BatchPathCosts(8, {}, {"eight": 1.0})
    with pytest.raises(ValueError, match="must map channel counts"):
        BatchPathCosts(8, {}, {16: "1.0"})
    with pytest.raises(ValueError, match="must map channel counts"):
        BatchPathCosts(8, {}, {16: True})
    with pytest.raises(ValueError, match="keys"):
        BatchPathCosts.from_dict({"batch_size": 8, "grouped": {}})


# -- the runtime -----------------------------------------------------------------------------------


def _block(same_selection: bool = False) -> GatedResidualBlock:
    torch.manual_seed(0)
    block = BasicBlock(24, 24, 24, 1).eval()  # no shortcut convolution
    gated = GatedResidualBlock(copy.deepcopy(block), block_layout(block), 24, 14, True, False, GateRuntime()).eval()
    with torch.no_grad():
        fc = gated.channel_gate.fc
        if same_selection:  # every image keeps the same channels, so the union is the kept count
            fc.weight.zero_()
            fc.bias.copy_(torch.arange(24, 0, -1, dtype=fc.bias.dtype))
        else:
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=torch.Generator().manual_seed(2)))
    gated.set_keep(8, gated.inner_width)
    return gated


def _producer_calls(gated: GatedResidualBlock, x: torch.Tensor, monkeypatch) -> list[tuple[int, int]]:
    """Run ``gated`` in skip mode and return (output channels, groups) of each 3x3 convolution it ran.

    The first is the producer: a shortcut convolution is 1x1, and the consumer runs after the producer.
    """
    calls = []
    conv2d = F.conv2d

    def spy(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if weight.shape[-1] > 1:
            calls.append((weight.shape[0], groups))
        return conv2d(input, weight, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(F, "conv2d", spy)
    with torch.no_grad():
        gated(x)
    monkeypatch.setattr(F, "conv2d", conv2d)
    return calls


@pytest.mark.parametrize("same_selection, grouped, gathered, producer", [
    # grouped cheapest: one grouped convolution, 8 channels for each of the 4 images
    (False, {8: 0.1}, {8: 1.0, 16: 1.0, 24: 1.0}, (4 * 8, 4)),
    # gathering the union of identical selections (8 channels) cheapest
    (True, {8: 5.0}, {8: 0.5, 16: 1.0, 24: 2.0}, (8, 1)),
    # everything but dense costs more, even gathering a union of 8, which the old share rule would gather
    (True, {8: 5.0}, {8: 5.0, 16: 5.0, 24: 1.0}, (24, 1)),
])
def test_costs_pick_the_path_and_match_mask(same_selection, grouped, gathered, producer, monkeypatch):
    gated = _block(same_selection)
    gated.batch_costs = BatchPathCosts(4, grouped, gathered)
    x = torch.randn(4, 24, 14, 14, generator=torch.Generator().manual_seed(3))
    assert _producer_calls(gated, x, monkeypatch)[0] == producer
    skipped, masked = skip_and_mask_outputs(gated, x)
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)


def test_costs_override_grouped_limit(monkeypatch):
    gated = _block()
    gated.grouped_max_channels = 24  # alone, it would group
    gated.batch_costs = BatchPathCosts(4, {8: 5.0}, {8: 5.0, 16: 5.0, 24: 1.0})
    x = torch.randn(4, 24, 14, 14, generator=torch.Generator().manual_seed(3))
    assert _producer_calls(gated, x, monkeypatch)[0] == (24, 1)
    gated.batch_costs = None
    assert _producer_calls(gated, x, monkeypatch)[0] == (32, 4)


def test_block_rejects_costs_of_another_width():
    gated = _block()
    with pytest.raises(ValueError, match="up to the block's 24 inner channels"):
        gated.batch_costs = BatchPathCosts(4, {8: 1.0}, {8: 1.0, 32: 2.0})
    with pytest.raises(ValueError, match="grouping below them"):
        gated.batch_costs = BatchPathCosts(4, {24: 1.0}, {24: 2.0})
    with pytest.raises(TypeError, match="BatchPathCosts or None"):
        gated.batch_costs = {"batch_size": 4}


# -- placement and records -------------------------------------------------------------------------



def test_batch_path_modules_run_their_paths(subnet, monkeypatch):
    config = parse_gate_config(ALL)
    site = find_block_sites(subnet, (1, 28, 28))[3]  # layer3.0: 32 channels
    block = subnet.get_submodule(site.name)
    modules = batch_path_modules(block, site, [16, 24], config)
    assert sorted(modules) == [("gathered", 16), ("gathered", 24), ("gathered", 32), ("grouped", 16), ("grouped", 24)]
    generator = torch.Generator().manual_seed(4)
    # Large per-image channel means make untrained gates select differently per image.
    x = (torch.randn(4, site.in_channels, site.in_size, site.in_size, generator=generator)
         + 10 * torch.randn(4, site.in_channels, 1, 1, generator=generator))
    expected = {("grouped", 16): (4 * 16, 4), ("grouped", 24): (4 * 24, 4),
                ("gathered", 16): (16, 1), ("gathered", 24): (24, 1), ("gathered", 32): (32, 1)}
    for key, module in modules.items():
        assert _producer_calls(module, x, monkeypatch)[0] == expected[key], key
    with pytest.raises(ValueError, match="below the block's 32 channels"):
        batch_path_modules(block, site, [32], config)


def test_time_batch_paths_times_every_width(subnet):
    config = parse_gate_config(ALL)
    site = find_block_sites(subnet, (1, 28, 28))[3]
    protocol = MeasurementProtocol(device="cpu", threads=1, warmup=1, repeats=2)
    costs = time_batch_paths(subnet.get_submodule(site.name), site, [16, 24], config, protocol, 4)
    assert costs.batch_size == 4
    assert list(costs.grouped) == [16, 24]
    assert list(costs.gathered) == [16, 24, 32]  # multiples of 8 from the smallest count; 32 is dense


def test_measured_placement_stores_costs_and_record_rebuilds_them(subnet, monkeypatch):
    import nas.gates.timing as timing

    # The fake timings make channel gates pay at batch 1 and cost nothing at batch 4, so every block
    # gets a channel gate. Its batch paths are timed for real.
    def fake_timer(config, protocol):
        return lambda block, site, steps: {"none": {1: 1.0, 4: 1.0}, "channel": {1: 0.5, 4: 1.0}}

    monkeypatch.setattr(timing, "make_block_timer", fake_timer)
    monkeypatch.setattr(timing, "time_channel_counts",
                        lambda block, site, counts, *args, **kwargs: {count: 0.01 * count for count in counts})
    config = {**ALL, "placement": "measure", "measure_batch_sizes": [1, 4]}
    protocol = MeasurementProtocol(device="cpu", threads=1, warmup=1, repeats=2)
    network = apply_gates(subnet, config, protocol=protocol)
    gated = [plan for plan in network.plans if plan.channel]
    assert len(gated) == len(network.plans)
    for plan in gated:
        block = network.gated_blocks()[plan.name]
        assert plan.batch_costs is not None and plan.batch_costs.batch_size == 4
        assert block.batch_costs == plan.batch_costs
        assert "batches above 1 take the cheaper path" in plan.reason
    record = network.describe()
    rebuilt = apply_gates(subnet, config, plan=record)
    assert [p.batch_costs for p in rebuilt.plans] == [p.batch_costs for p in network.plans]

    entry = next(e for e in record["blocks"] if e["batch_costs"] is not None)
    entry["batch_costs"]["gathered"] = {"8": 1.0, "64": 2.0}
    with pytest.raises(GateConfigError, match="time 64 inner channels"):
        apply_gates(subnet, config, plan=record)
    entry["batch_costs"]["gathered"] = {"8": -1.0}
    with pytest.raises(GateConfigError, match="Invalid block plan"):
        apply_gates(subnet, config, plan=record)


def test_older_plan_without_costs_loads():
    plan = BlockPlan("layer1.0", True, False, [8, 16], "test", grouped_max_channels=8)
    data = plan.to_dict()
    assert data["batch_costs"] is None
    del data["batch_costs"]
    assert BlockPlan.from_dict(data).batch_costs is None


def test_record_rejects_invalid_batch_costs(subnet):
    network = apply_gates(subnet, ALL)
    record = network.describe()
    entry = record["blocks"][0]  # layer1.0: 16 channels
    entry["batch_costs"] = BatchPathCosts(4, {16: 1.0}, {16: 2.0}).to_dict()
    with pytest.raises(GateConfigError, match=r"grouping at kept counts \[16\]"):
        apply_gates(subnet, ALL, plan=record)
    entry["batch_costs"] = BatchPathCosts(4, {8: 1.0}, {16: 2.0}).to_dict()
    entry["channel"] = False
    with pytest.raises(GateConfigError, match="batch_costs but no channel gate"):
        apply_gates(subnet, ALL, plan=record)


def test_describe_records_costs_set_on_blocks(subnet):
    network = apply_gates(subnet, ALL)
    costs = BatchPathCosts(4, {8: 1.0}, {8: 1.5, 16: 2.0})
    network.gated_blocks()["layer1.0"].batch_costs = costs
    record = network.describe()
    assert BatchPathCosts.from_dict(record["blocks"][0]["batch_costs"]) == costs
    assert apply_gates(subnet, ALL, plan=record).gated_blocks()["layer1.0"].batch_costs == costs


def test_gated_runs_follow_costs(subnet):
    sites = find_block_sites(subnet, (1, 28, 28))
    plan = BlockPlan(sites[0].name, True, False, [8, 16], "test", grouped_max_channels=0,
                     batch_costs=BatchPathCosts(4, {8: 1.0}, {8: 1.5, 16: 2.0}))
    runs = dict(gated_runs(sites[:1], [plan], 0.5, 32))
    assert runs[sites[0].name]["grouped"] is True  # grouping 8 beats dense, so the limit of 0 is ignored
    slow = BlockPlan(sites[0].name, True, False, [8, 16], "test", grouped_max_channels=16,
                     batch_costs=BatchPathCosts(4, {8: 3.0}, {8: 1.5, 16: 2.0}))
    assert dict(gated_runs(sites[:1], [slow], 0.5, 32))[sites[0].name]["grouped"] is False
    assert dict(gated_runs(sites[:1], [slow], 0.5, 1))[sites[0].name]["grouped"] is False


@pytest.mark.parametrize("key, value, message", [
    ("channel", "yes", "channel must be true or false"),
    ("channel_steps", [], "channel_steps must be a non-empty ascending list"),
    ("channel_steps", ["abc"], "channel_steps must be a non-empty ascending list"),
    ("channel_steps", [16, 8], "channel_steps must be a non-empty ascending list"),
    ("latency_ms", {"8": -1.0}, "latency_ms and measured_ms must map counts"),
    ("grouped_max_channels", True, "grouped_max_channels must be an integer"),
])
def test_record_rejects_edited_fields(subnet, key, value, message):
    record = apply_gates(subnet, ALL).describe()
    record["blocks"][0][key] = value
    with pytest.raises(GateConfigError, match=message):
        apply_gates(subnet, ALL, plan=record)


def test_record_without_blocks_names_the_keys(subnet):
    record = apply_gates(subnet, ALL).describe()
    del record["keep_ratio"]
    with pytest.raises(GateConfigError, match=r"misses \['keep_ratio'\]"):
        apply_gates(subnet, ALL, plan=record)


def test_record_with_unknown_batchnorm_path_names_it(subnet):
    from nas.gates import calibrate_keep_ratios

    network = apply_gates(subnet, ALL)
    images = [(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
    calibrate_keep_ratios(network, images, 1, [0.5, 1.0])
    record = network.describe()
    record["batchnorm_stats"]["paths"][0] = "layer1.0.bn9"
    with pytest.raises(GateConfigError, match="'layer1.0.bn9' with .* but the model has no BatchNorm layer"):
        apply_gates(subnet, ALL, plan=record)


def test_measured_placement_drops_column_gate_not_paying_alone(subnet, monkeypatch):
    import nas.gates.timing as timing

    # Channel+column wins the option round, but no kept channel count saves time, and the column
    # gate alone is slower than no gate.
    def fake_timer(config, protocol):
        return lambda block, site, steps: {"none": {1: 1.0, 4: 1.0}, "channel": {1: 0.9, 4: 1.0},
                                           "column": {1: 1.2, 4: 1.0}, "channel+column": {1: 0.8, 4: 1.0}}

    monkeypatch.setattr(timing, "make_block_timer", fake_timer)
    monkeypatch.setattr(timing, "time_channel_counts", lambda block, site, counts, *args, **kwargs: {c: 1.0 for c in counts})
    config = {**ALL, "spatial": True, "placement": "measure", "measure_batch_sizes": [1, 4]}
    protocol = MeasurementProtocol(device="cpu", threads=1, warmup=1, repeats=2)
    network = apply_gates(subnet, config, protocol=protocol)
    assert network.plans
    for plan in network.plans:
        assert not plan.channel
        assert not plan.spatial
        assert plan.reason.startswith("no column gate either")

"""Tests of gate-aware latency: block signatures, runs, features, profiling, the model and budgets."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nas.gates import (
    GateConfigError,
    apply_gates,
    confirm_budget,
    find_block_sites,
    measure_batch_slowdown,
    parse_gate_config,
)
import nas.gates.timing as timing_module
from nas.gates.budget import choose_keep_ratio, gated_runs, predict_latency_ms
from nas.gates.planning import plan_blocks
from nas.supernet.resnet import BasicBlock
from predictors.features import HardwareFacts
from predictors.fingerprint import device_fingerprint
from predictors.gated import (
    GatedBlockLatency,
    GatedLatencyError,
    block_runs,
    block_signature,
    collect_blocks,
    evaluate_gated_latency,
    fit_for_model,
    gated_block_features,
    profile_gated_blocks,
    run_key,
)
from predictors.protocol import MeasurementProtocol
from predictors.store import ProfileStore
from tests.conftest import interrupt_after

HW = HardwareFacts(device="cpu", simd_width=16, threads=1)
# One timed pass per run: these tests check bookkeeping, not latency.
QUICK = MeasurementProtocol(threads=1, warmup=0, repeats=1)
ALL = {"name": "feature", "placement": "all"}



def _block_and_site():
    """A basic block 16 -> 24 channels, stride 2, on a 14x14 input: its inner map is 24 x 7 x 7."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("block", BasicBlock(16, 24, 24, stride=2))
    site = find_block_sites(model, (16, 14, 14))[0]
    return model.block, site


def test_block_signature_hand_made():
    block, site = _block_and_site()
    signature = block_signature(block, site)
    assert signature["type"] == "BasicBlock"
    assert signature["in_channels"] == 16
    assert signature["in_size"] == 14
    assert signature["producer"] == 0
    assert [(s["in_channels"], s["out_channels"], s["in_size"], s["stride"]) for s in signature["stages"]] == [
        (16, 24, 14, 2), (24, 24, 7, 1)]
    assert signature["shortcut"]
    assert not signature["squeeze_excite"]


def test_block_runs_hand_made():
    block, site = _block_and_site()
    runs = block_runs(block_signature(block, site), batch_size=1)
    by_option: dict[str, list[tuple[int, int]]] = {}
    for run in runs:
        by_option.setdefault(run["option"], []).append((run["channels"], run["columns"]))
    assert by_option["none"] == [(24, 7)]
    assert by_option["channel"] == [(8, 7), (16, 7)]
    # ceil(r * 7) for r = 0.25 ... 0.875 is 2, 3, 4, 5, 6, 7; keeping all 7 is left out.
    assert by_option["column"] == [(24, 2), (24, 3), (24, 4), (24, 5), (24, 6)]
    # ceil(r * 24) rounded up to 8: 8, 16, 16, 16, 24, 24; pairs keeping all channels are left out.
    assert by_option["channel+column"] == [(8, 2), (16, 3), (16, 4), (16, 5)]
    grouped = block_runs(block_signature(block, site), batch_size=4, column=False, grouped=True)
    assert sum(run["grouped"] for run in grouped) == 2


def test_features_count_kept_macs_by_hand():
    block, site = _block_and_site()
    signature = block_signature(block, site)
    run = {"option": "channel+column", "channels": 8, "columns": 4, "grouped": False}
    features = gated_block_features(signature, run, 1, HW)
    producer = 16 * 9 * 24 * 7 * 7  # 3x3 conv, 16 -> 24 channels, 7x7 output
    consumer = 24 * 9 * 24 * 7 * 7  # 3x3 conv, 24 -> 24 channels, 7x7 output
    assert features["full_macs"] == producer + consumer
    kept = (16 * 9 * 8 * 49 + 8 * 9 * 24 * 49) * 4 / 7
    assert features["kept_macs"] == pytest.approx(kept)
    assert features["producer_cpu_oc_remainder"] == 8  # 8 kept channels in 16 float32 lanes
    assert features["channel_gate"] == 1.0
    assert features["column_gate"] == 1.0
    with pytest.raises(GatedLatencyError, match="outside"):
        gated_block_features(signature, {**run, "channels": 25}, 1, HW)


def _synthetic_records(widths) -> list[dict]:
    """Records of basic blocks whose channel-gated latency is a staircase of 16 channels plus a gate cost."""
    records = []
    for in_channels, width, stride, size in widths:
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.add_module("block", BasicBlock(in_channels, width, width, stride=stride))
        site = find_block_sites(model, (in_channels, size, size))[0]
        signature = block_signature(model.block, site)
        for run in block_runs(signature, 1, column=False):
            steps = math.ceil(run["channels"] / 16) * 16 / width
            latency = 0.001 * width * size * size / stride**2 * (0.1 * (run["option"] != "none") + steps)
            records.append({"key": run_key(signature, run), "block": signature, "run": run, "pass": 0,
                            "latency_ms": latency, "measurement": {"protocol": {"batch_size": 1}}})
    return records


def test_model_learns_gated_staircase():
    widths = [(cin, w, s, size) for cin in (16, 32) for w in (32, 48, 64, 96, 128) for s, size in ((1, 14), (2, 28))]
    records = _synthetic_records(widths)
    report = evaluate_gated_latency(records, HW, holdout=0.25, seed=0)
    assert report["blocks_test"] == 5
    assert set(report) == {"blocks_train", "blocks_test", "runs_test", "batch_size", "model", "proportional"}
    assert report["model"]["within_10pct"] >= 0.9
    assert report["proportional"]["within_10pct"] < 0.5  # MACs miss the gate's cost and the steps


def test_model_input_order_and_delta():
    records = _synthetic_records([(16, 32, 1, 14), (16, 64, 1, 14), (32, 64, 2, 28)])
    model = GatedBlockLatency.fit(records, HW)
    shuffled = GatedBlockLatency.fit(list(reversed(records)), HW)
    blocks = [r["block"] for r in records]
    runs = [r["run"] for r in records]
    assert np.allclose(model.predict(blocks, runs), shuffled.predict(blocks, runs), rtol=1e-5)
    none = [r for r in records if r["run"]["option"] == "none"]
    assert np.allclose(model.delta_ms([r["block"] for r in none], [r["run"] for r in none]), 0.0)


def test_model_fits_one_block():
    records = _synthetic_records([(16, 64, 1, 14)])
    model = GatedBlockLatency.fit(records, HW)
    predicted = model.predict([r["block"] for r in records], [r["run"] for r in records])
    measured = np.array([r["latency_ms"] for r in records])
    assert np.all(np.abs(predicted - measured) / measured < 0.1)


def test_fit_rejects_bad_records():
    records = _synthetic_records([(16, 32, 1, 14)])
    with pytest.raises(GatedLatencyError, match="at least 5 distinct runs"):
        GatedBlockLatency.fit(records[:4], HW)
    mixed = _synthetic_records([(16, 32, 1, 14), (16, 64, 1, 14)])
    mixed[0] = copy.deepcopy(mixed[0])
    mixed[0]["measurement"]["protocol"]["batch_size"] = 8
    with pytest.raises(GatedLatencyError, match="mix batch sizes"):
        GatedBlockLatency.fit(mixed, HW)


def test_profile_gated_blocks_resumes(subnet, tmp_path, monkeypatch):
    store = ProfileStore(tmp_path, device_fingerprint(QUICK))
    blocks = collect_blocks([(subnet, (1, 28, 28))])
    assert [b[1].name for b in blocks] == ["layer1.0", "layer2.0", "layer2.1", "layer3.0"]
    total = sum(len(block_runs(signature, 1)) for _, _, signature in blocks)
    add = store.add_gated_block
    monkeypatch.setattr(store, "add_gated_block", interrupt_after(add, 7))
    with pytest.raises(KeyboardInterrupt):
        profile_gated_blocks(blocks, store, QUICK, passes=1, progress=False)
    assert len(store.gated_block_records(1)) == 7
    monkeypatch.setattr(store, "add_gated_block", add)
    assert profile_gated_blocks(blocks, store, QUICK, passes=1, progress=False) == total - 7
    records = store.gated_block_records(1)
    assert len({r["key"] for r in records}) == len(records) == total
    assert all(r["latency_ms"] > 0 and r["kind"] == "gated_block" for r in records)
    assert profile_gated_blocks(blocks, store, QUICK, passes=1, progress=False) == 0


def test_profile_rejects_other_runtimes(subnet, tmp_path):
    protocol = MeasurementProtocol(runtime="compile", threads=1)
    store = ProfileStore(tmp_path, device_fingerprint(protocol))
    with pytest.raises(GatedLatencyError, match="runtime=eager"):
        profile_gated_blocks(collect_blocks([(subnet, (1, 28, 28))]), store, protocol)


class _StubLatency:
    """A block model whose gated latency is the block's kept share of 1 ms per block."""

    batch_size = 1

    def delta_ms(self, blocks, runs):
        shares = [run["channels"] / b["stages"][0]["out_channels"] * run["columns"] / b["stages"][-1]["in_size"]
                  for b, run in zip(blocks, runs)]
        return np.array([share - 1.0 for share in shares])


def test_budget_picks_largest_fitting_ratio(subnet):
    sites = find_block_sites(subnet, (1, 28, 28))
    config = parse_gate_config(ALL)
    plans = plan_blocks(sites, config, None)
    signatures = {site.name: block_signature(subnet.get_submodule(site.name), site) for site in sites}
    stub = _StubLatency()
    full = predict_latency_ms(10.0, sites, plans, signatures, 1.0, stub)
    low = predict_latency_ms(10.0, sites, plans, signatures, config.keep_ratio_range[0], stub)
    assert full == 10.0
    assert low < full
    budget = (low + full) / 2
    budget_config = parse_gate_config({**ALL, "latency_budget_ms": budget})
    ratio = choose_keep_ratio(10.0, sites, plans, signatures, budget_config, stub)
    assert predict_latency_ms(10.0, sites, plans, signatures, ratio, stub) <= budget
    assert predict_latency_ms(10.0, sites, plans, signatures, ratio + 0.01, stub) > budget
    with pytest.raises(GateConfigError, match="below the predicted"):
        choose_keep_ratio(10.0, sites, plans, signatures, parse_gate_config({**ALL, "latency_budget_ms": low / 2}), stub)


class _SlowerGates:
    """A block model whose gates cost 0.5 ms per block at every kept count."""

    batch_size = 1

    def delta_ms(self, blocks, runs):
        return np.full(len(runs), 0.5)


def test_budget_gates_slow_every_ratio(subnet):
    sites = find_block_sites(subnet, (1, 28, 28))
    config = parse_gate_config({**ALL, "latency_budget_ms": 9.0})
    plans = plan_blocks(sites, config, None)
    signatures = {site.name: block_signature(subnet.get_submodule(site.name), site) for site in sites}
    with pytest.raises(GateConfigError, match="predicted to slow this subnet down .* at every ratio.*placement=measure"):
        choose_keep_ratio(10.0, sites, plans, signatures, config, _SlowerGates())


def test_gated_runs_follow_the_runtime(subnet):
    sites = find_block_sites(subnet, (1, 28, 28))
    plans = plan_blocks(sites, parse_gate_config(ALL), None)
    for plan in plans:
        plan.grouped_max_channels = 8
    runs = dict(gated_runs(sites, plans, 0.25, batch_size=1))
    assert runs["layer1.0"] == {"option": "channel+column", "channels": 8, "columns": 7, "grouped": False}
    runs = dict(gated_runs(sites, plans, 1.0, batch_size=1))
    assert runs["layer1.0"]["option"] == "none"
    for plan in plans:
        plan.spatial = False
    plans[1].grouped_max_channels = 0
    runs = dict(gated_runs(sites, plans, 0.25, batch_size=32))
    assert runs["layer1.0"] == {"option": "channel", "channels": 8, "columns": 28, "grouped": True}
    assert not runs["layer2.0"]["grouped"]
    assert runs["layer3.0"] == {"option": "channel", "channels": 8, "columns": 7, "grouped": True}


def test_apply_gates_budget_needs_block_latency(subnet):
    with pytest.raises(GateConfigError, match="needs gated-block latency"):
        apply_gates(subnet, {**ALL, "latency_budget_ms": 1.0}, protocol=QUICK)
    stub = _StubLatency()
    stub.batch_size = 8
    with pytest.raises(GateConfigError, match="batch size 8"):
        apply_gates(subnet, {**ALL, "latency_budget_ms": 1.0}, protocol=QUICK, block_latency=stub)


def test_fit_for_model_profiles_and_budgets(subnet, tmp_path):
    store = ProfileStore(tmp_path, device_fingerprint(QUICK))
    model = fit_for_model(subnet, (1, 28, 28), store, QUICK, passes=1, progress=False)
    assert model.blocks == 4
    assert {r["source"] for r in store.gated_block_records(1)} == {"train"}
    network = apply_gates(subnet, {**ALL, "latency_budget_ms": 1e6}, protocol=QUICK, block_latency=model)
    assert network.keep_ratio == network.config.keep_ratio == 1.0  # fine-tuning targets the budget's ratio
    with pytest.raises(GateConfigError, match="latency_budget_ms=1e-06"):
        apply_gates(subnet, {**ALL, "latency_budget_ms": 1e-6}, protocol=QUICK, block_latency=model)


class _OptimisticLatency:
    """A block model that predicts every gated block 1 s faster than ungated."""

    batch_size = 1

    def delta_ms(self, blocks, runs):
        return np.array([0.0 if run["option"] == "none" else -1000.0 for run in runs])


def test_budget_confirmed_by_measurement(subnet, caplog):
    config = {**ALL, "latency_budget_ms": 1e-3}
    with caplog.at_level("INFO", logger="nas.gates"):
        with pytest.raises(GateConfigError, match="below the measured"):
            apply_gates(subnet, config, protocol=QUICK, block_latency=_OptimisticLatency())
    assert "predicted" in caplog.text  # the prediction fitted the budget
    assert "trying" in caplog.text  # and measuring lowered the ratio before giving up


def _latency_by_share(network, ms_at_full: float):
    """Return a stand-in for ``_measure_ms`` whose latency is ``ms_at_full`` times the kept share of channels."""

    def measure(model, shape, protocol, rounds=3):
        blocks = network.gated_blocks()
        kept = sum(block.kept_channels for block in blocks.values())
        return ms_at_full * kept / sum(block.inner_channels for block in blocks.values())

    return measure


@pytest.mark.parametrize("start", [0.4, 0.9])
def test_confirm_budget_highest_fitting_counts(subnet, monkeypatch, start):
    from nas.gates import network as network_module

    config = {**ALL, "spatial": False, "latency_budget_ms": 7.0}
    network = apply_gates(subnet, {**config, "latency_budget_ms": None}, protocol=QUICK)
    network.config = parse_gate_config(config)
    monkeypatch.setattr(network_module, "_measure_ms", _latency_by_share(network, 10.0))
    network.set_keep_ratio(start)
    ratio = confirm_budget(network, (1, 28, 28), QUICK)
    assert network.keep_ratio == ratio
    fits = network_module._measure_ms(network, (1, 28, 28), QUICK)
    assert fits <= 7.0
    # The next change of kept counts upwards measures over the budget.
    higher = network_module._next_counts(network, ratio, +1, 1.0)
    assert higher is not None
    assert network_module._measure_ms(network, (1, 28, 28), QUICK) > 7.0


def test_confirm_budget_rises_to_range_top(subnet, monkeypatch):
    from nas.gates import network as network_module

    network = apply_gates(subnet, {**ALL, "spatial": False}, protocol=QUICK)
    network.config = parse_gate_config({**ALL, "spatial": False, "latency_budget_ms": 100.0})
    monkeypatch.setattr(network_module, "_measure_ms", _latency_by_share(network, 10.0))
    network.set_keep_ratio(0.5)
    counts_at_half = network.keep_counts()
    ratio = confirm_budget(network, (1, 28, 28), QUICK)
    assert ratio > 0.5
    confirmed = network.keep_counts()
    assert confirmed != counts_at_half
    # Above the confirmed ratio no kept count changes any more: it keeps what the top of the range keeps.
    network.set_keep_ratio(network.config.keep_ratio_range[1])
    assert network.keep_counts() == confirmed


def test_budget_without_gates_names_cause(subnet):
    sites = find_block_sites(subnet, (1, 28, 28))
    config = parse_gate_config({**ALL, "channel": False, "spatial": False, "latency_budget_ms": 1.0})
    plans = plan_blocks(sites, config, None)
    assert not any(plan.channel or plan.spatial for plan in plans)
    assert choose_keep_ratio(0.5, sites, plans, {}, config, _StubLatency()) == 1.0
    with pytest.raises(GateConfigError, match="placement put no gate"):
        choose_keep_ratio(2.0, sites, plans, {}, config, _StubLatency())
    network = apply_gates(subnet, {**ALL, "channel": False, "spatial": False})
    with pytest.raises(GateConfigError, match="needs gates.latency_budget_ms"):
        confirm_budget(network, (1, 28, 28), QUICK)
    network.config = parse_gate_config({**ALL, "latency_budget_ms": 1e-6})
    with pytest.raises(GateConfigError, match="placement put no gate"):
        confirm_budget(network, (1, 28, 28), QUICK)


def test_budget_fits_model_for_gated_blocks_only(subnet, tmp_path):
    calls = []

    def fit(model, input_shape, names):
        calls.append(list(names))
        store = ProfileStore(tmp_path, device_fingerprint(QUICK))
        return fit_for_model(model, input_shape, store, QUICK, names=names, passes=1, progress=False)

    network = apply_gates(subnet, {**ALL, "latency_budget_ms": 1e6}, protocol=QUICK, block_latency=fit)
    assert calls == [sorted(network.gated_blocks())]
    records = ProfileStore(tmp_path, device_fingerprint(QUICK)).gated_block_records(1)
    assert len({json.dumps(r["block"], sort_keys=True) for r in records}) == len(calls[0])


def test_batch_slowdown_per_ratio(subnet, monkeypatch):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.6, "measure_batch_sizes": [1, 4, 3]})
    images = torch.randn(5, 1, 28, 28)
    timed, copies = [], {}
    fake_ms = {"ungated": 10.0, 0.4: 9.0, 1.0: 11.0}

    def fake_measure(module, shape, protocol, record_operators=True, inputs=None):
        key = getattr(module, "keep_ratio", "ungated")  # the ungated subnet has no keep ratio
        timed.append((key, protocol.batch_size, inputs))
        # The second copy of the ungated subnet to be timed measures 2% slower.
        if key == "ungated":
            copies.setdefault(id(module), len(copies))
        noise = 1.02 if key == "ungated" and copies[id(module)] == 1 else 1.0
        return SimpleNamespace(median_ms=fake_ms[key] * protocol.batch_size * noise)

    monkeypatch.setattr(timing_module, "measure_module", fake_measure)
    records = measure_batch_slowdown(network, subnet, (1, 28, 28), images, [0.4, 1.0], QUICK, rounds=2)

    assert [r["batch_size"] for r in records] == [3, 4]
    for record in records:
        batch = record["batch_size"]
        assert record["ungated_ms"] == 10.0 * batch
        assert record["gated_ms"] == {0.4: 9.0 * batch, 1.0: 11.0 * batch}
        assert record["worst_ratio"] == 1.0
        assert record["worst_slowdown"] == pytest.approx(0.1)
        assert record["max_slowdown"] == 0.05
        assert record["ungated_spread"] == pytest.approx(0.02)
        assert record["timing_noise"] == pytest.approx(0.1)  # keep 1.0, where no gate runs, measured 10% off
    assert sorted({key for key, _, _ in timed}, key=str) == sorted({"ungated", 0.4, 1.0}, key=str)
    # Batch sizes x (the check and its repeat, as keep 1.0 measured over the bound) x rounds x
    # models (the ungated subnet twice).
    assert len(timed) == 2 * 2 * 2 * 4
    for _, batch, inputs in timed:
        assert torch.equal(inputs, images[:batch])
    assert network.keep_ratio == 0.6


def test_batch_slowdown_retimes_over_bound(subnet, monkeypatch):
    from nas.gates import timing as timing_module

    network = apply_gates(subnet, {**ALL, "measure_batch_sizes": [1, 4]})
    calls = []

    def fake_medians(modules, shape, protocol, rounds=2, inputs=None):
        calls.append(rounds)
        # The first pass catches keep 0.4 in a noisy moment; the second times it as it is.
        slow = 1.3 if len(calls) == 1 else 1.0
        return {name: (10.0 * slow if name == 0.4 else 10.0) for name in modules}

    monkeypatch.setattr(timing_module, "fastest_medians", fake_medians)
    [record] = measure_batch_slowdown(network, subnet, (1, 28, 28), None, [0.4, 1.0], QUICK, rounds=3)
    assert calls == [3, 3]
    assert record["gated_ms"] == {0.4: 10.0, 1.0: 10.0}
    assert record["worst_slowdown"] == 0.0

    calls.clear()
    monkeypatch.setattr(timing_module, "fastest_medians",
                        lambda modules, *args, **kwargs: calls.append(1) or {name: 10.0 for name in modules})
    measure_batch_slowdown(network, subnet, (1, 28, 28), None, [0.4, 1.0], QUICK)
    assert calls == [1]  # within the bound: timed once


def test_batch_slowdown_rejects_bad_ratios(subnet):
    network = apply_gates(subnet, {**ALL, "keep_ratio": 0.4, "measure_batch_sizes": [1, 4]})
    with pytest.raises(GateConfigError, match="outside gates.keep_ratio_range"):
        measure_batch_slowdown(network, subnet, (1, 28, 28), None, [0.6, 0.1], QUICK)
    assert network.keep_ratio == 0.4
    with pytest.raises(ValueError, match="at least one keep ratio"):
        measure_batch_slowdown(network, subnet, (1, 28, 28), None, [], QUICK)
    with pytest.raises(ValueError, match="rounds >= 1"):
        measure_batch_slowdown(network, subnet, (1, 28, 28), None, [0.6], QUICK, rounds=0)


def test_batch_slowdown_needs_enough_images(subnet):
    network = apply_gates(subnet, {**ALL, "measure_batch_sizes": [1, 4]})
    with pytest.raises(ValueError, match="needs 4 images for batch size 4, but got 2"):
        measure_batch_slowdown(network, subnet, (1, 28, 28), torch.randn(2, 1, 28, 28), [1.0], QUICK)

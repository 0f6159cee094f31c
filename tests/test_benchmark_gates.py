"""The statistics of benchmarks/gates.py: intervals, the paired test, the targets and the seed average."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def gates_bench() -> ModuleType:
    return load_benchmark("gates")


def point(ratio: float, accuracy: float, latency: float, macs: int = 1000, images: int = 100) -> dict:
    return {"keep_ratio": ratio, "accuracy": accuracy, "test_images": images, "macs": macs,
            "latency_b1_ms": latency, "latency_b32_ms": 10 * latency, "accuracy_low": 0.0, "accuracy_high": 1.0}


def test_wilson_interval_narrows_with_images(gates_bench: ModuleType) -> None:
    low, high = gates_bench.wilson_interval(90, 100)
    assert low < 0.9 < high
    wide = high - low
    low, high = gates_bench.wilson_interval(900, 1000)
    assert low < 0.9 < high
    assert high - low < wide / 2
    # Known value: 95% Wilson interval of 90/100 is about (0.826, 0.945).
    assert gates_bench.wilson_interval(90, 100) == pytest.approx((0.8256, 0.9448), abs=1e-3)


def test_mcnemar_small_only_when_worse(gates_bench: ModuleType) -> None:
    reference = np.array([True] * 20 + [False] * 5)
    worse = np.array([False] * 15 + [True] * 5 + [False] * 5)
    assert gates_bench.mcnemar_p_worse(reference, worse) < 0.001
    assert gates_bench.mcnemar_p_worse(reference, reference.copy()) == 1.0
    better = np.ones_like(reference)
    assert gates_bench.mcnemar_p_worse(reference, better) == 1.0


def test_paired_test_counts_images_once(gates_bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    reference = rng.random(200) < 0.95
    other = rng.random(200) < 0.9
    one_seed = gates_bench.mcnemar_p_worse(reference, other)
    # The same predictions from two seeds add no evidence about the test images.
    assert gates_bench.mcnemar_p_worse(np.stack([reference, reference]), np.stack([other, other])) == one_seed
    # Per image, the seeds' correct predictions: reference 2, 1, 1, 0 against other 0, 0, 2, 0. Two
    # images favour reference, one favours other and one ties, so p = P(X >= 2 | 3 flips) = 1/2.
    reference = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool)
    other = np.array([[0, 0, 1, 0], [0, 0, 1, 0]], dtype=bool)
    assert gates_bench.mcnemar_p_worse(reference, other) == 0.5
    with pytest.raises(ValueError, match="one shape"):
        gates_bench.mcnemar_p_worse(reference, other[:1])


def test_targets_static_share_and_meeting(gates_bench: ModuleType) -> None:
    hits = np.ones(100, dtype=bool)
    baseline = point(1.0, 0.98, 2.0, macs=1000)
    points = [point(1.0, 0.98, 2.0, macs=1000), point(0.5, 0.98, 1.5, macs=700), point(0.25, 0.97, 1.0, macs=300)]
    # A static subnet at 1.2 ms more accurate than every gated point: from 1.2 ms up the curve loses.
    static = [point(1.0, 0.99, 1.2)]
    targets = gates_bench.evaluate_targets(points, [hits] * 3, baseline, hits, static)
    assert targets["meeting"] == [0.25]
    assert targets["static_share"] == pytest.approx(0.2, abs=0.01)
    assert gates_bench.evaluate_targets(points, [hits] * 3, baseline, hits, [])["static_share"] == 1.0


def seed_run(seed: int, accuracies: list[float], baseline: float, static: float) -> dict:
    ratios = [1.0, 0.5]
    rng = np.random.default_rng(seed)
    return {"seed": seed,
            "points": [point(r, a, 2.0 * r + seed) for r, a in zip(ratios, accuracies)],
            "hits": [rng.random(100) < a for a in accuracies],
            "baseline": {**point(1.0, baseline, 2.0), "arch": {"widths": [8]}},
            "baseline_hits": rng.random(100) < baseline,
            "static": [point(1.0, static, 1.0)],
            "static_archs": ["a"], "gates": {}}


def test_seed_average_means_and_stacks(gates_bench: ModuleType) -> None:
    runs = [seed_run(0, [0.98, 0.96], 0.97, 0.95), seed_run(1, [0.96, 0.94], 0.99, 0.97)]
    merged = gates_bench.average_seed_runs(runs)
    first = merged["points"][0]
    assert first["accuracy"] == pytest.approx(0.97)
    assert first["accuracy_per_seed"] == [0.98, 0.96]
    assert first["latency_b1_ms"] == pytest.approx(2.5)
    # Both seeds tested the same 100 images: the interval is that of the mean on 100 images.
    assert first["test_images"] == 100
    assert (first["accuracy_low"], first["accuracy_high"]) == gates_bench.wilson_interval(97, 100)
    assert merged["baseline"]["accuracy"] == pytest.approx(0.98)
    assert merged["baseline"]["arch"] == {"widths": [8]}
    assert merged["static"][0]["accuracy"] == pytest.approx(0.96)
    assert len(merged["hits"]) == 2
    assert merged["hits"][1].shape == (2, 100)
    assert np.array_equal(merged["hits"][1][1], runs[1]["hits"][1])
    assert merged["baseline_hits"].shape == (2, 100)


def test_seed_average_single_run_unchanged(gates_bench: ModuleType) -> None:
    run = seed_run(0, [0.98, 0.96], 0.97, 0.95)
    merged = gates_bench.average_seed_runs([run])
    assert merged["points"][1]["accuracy"] == 0.96
    assert merged["points"][1]["macs"] == 1000
    assert (merged["points"][1]["accuracy_low"], merged["points"][1]["accuracy_high"]) == \
        gates_bench.wilson_interval(96, 100)


def test_seed_average_rejects_mismatched_runs(gates_bench: ModuleType) -> None:
    other = seed_run(1, [0.98, 0.96], 0.97, 0.95)
    other["points"][1]["keep_ratio"] = 0.4
    with pytest.raises(ValueError, match="same keep ratios"):
        gates_bench.average_seed_runs([seed_run(0, [0.98, 0.96], 0.97, 0.95), other])
    with pytest.raises(ValueError, match="at least one run"):
        gates_bench.average_seed_runs([])


class _StubArch:
    def to_dict(self) -> dict:
        return {"widths": [8]}

    def to_json(self) -> str:
        return '{"widths": [8]}'


class _StubSpace:
    def build_supernet(self) -> "_StubSpace":
        return self

    def build_static(self, arch: _StubArch) -> object:
        return object()


@pytest.mark.parametrize(("recipe", "expected"), [("finetune", [(4, 2e-3), (8, 1e-3)]), ("scratch", [(12, 2e-3)])])
def test_static_recipe_epochs_and_rates(gates_bench: ModuleType, monkeypatch, recipe, expected) -> None:
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(gates_bench, "train_epochs", lambda model, loader, epochs, lr: calls.append((epochs, lr)))
    monkeypatch.setattr(gates_bench, "describe_quality", lambda model, loader, images: ({"accuracy": 1.0}, None))
    args = SimpleNamespace(static_recipe=recipe, epochs=4, finetune_epochs=8, lr=2e-3)
    points, models = gates_bench.train_static(_StubSpace(), [_StubArch()], None, None, None, 0, args)
    assert calls == expected
    assert points == [{"arch": {"widths": [8]}, "accuracy": 1.0}]
    assert list(models) == ["static0"]


def test_static_picks_fill_a_narrow_range(gates_bench: ModuleType, monkeypatch) -> None:
    import argparse

    from nas.spaces import create_space
    from tests.conftest import load_space_config

    space = create_space({**load_space_config("resnet"), "in_channels": 1, "num_classes": 10})
    # MACs per million replace the latency, so nothing is timed.
    monkeypatch.setattr(gates_bench, "measure_latency_ms",
                        lambda model, shape, batch, threads, repeats: space.macs(model.arch) / 1e6)
    args = argparse.Namespace(seed=0, threads=1, repeats=1)
    smallest = space.macs(space.smallest()) / 1e6
    # Few of the first 40 draws fall in a range just above the smallest subnet.
    low, high = smallest, 1.6 * smallest
    picks = gates_bench.pick_static_archs(space, low, high, 4, args)
    assert len(picks) == 4
    assert all(low <= latency <= high for _, latency in picks)
    assert [latency for _, latency in picks] == sorted(latency for _, latency in picks)
    # A wide range is filled from the first 40 draws, as before.
    wide = gates_bench.pick_static_archs(space, 0.0, 1e9, 8, args)
    assert len(wide) == 8


def test_plot_labels_merge_coinciding_points(gates_bench: ModuleType) -> None:
    points = [point(0.5, 0.957, 0.424), point(0.4, 0.957, 0.4241), point(0.3, 0.956, 0.397)]
    groups = gates_bench._label_groups(points)
    assert sorted(groups.values()) == [["0.3"], ["0.5", "0.4"]]

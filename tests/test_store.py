"""Profile store: round trips, filtering on read, crash tolerance, format versions and the noise floor."""

from __future__ import annotations

import json
import logging

import pytest

from nas.spaces.layers import LayerSpec
from predictors.fingerprint import fingerprint_id
from predictors.profiling import Measurement
from predictors.store import STORE_FORMAT_VERSION, ProfileStore, StoreError, noise_floor_from_pairs

FINGERPRINT = {
    "device_type": "cpu",
    "cpu_model": "Test CPU",
    "simd_flags": ["avx2"],
    "torch_version": "2.0",
    "runtime": "eager",
    "dtype": "float32",
    "threads": 2,
}
CONV = LayerSpec("conv", 8, 16, 14, 3, 1, act="relu")
ADD = LayerSpec("add", 16, 16, 14, act="relu")


def make_measurement(median_ms: float, batch_size: int = 1, threads: int = 2, fp: dict | None = None) -> Measurement:
    protocol = {"device": "cpu", "runtime": "eager", "batch_size": batch_size, "threads": threads,
                "dtype": "float32", "warmup": 1, "repeats": 3}
    return Measurement(
        median_ms=median_ms, mean_ms=median_ms, p10_ms=median_ms * 0.9, p90_ms=median_ms * 1.1, iqr_ms=0.01,
        repeats=3, operators=[{"kind": "cpu_op", "name": "aten::conv2d", "count": 1}], protocol=protocol,
        fingerprint_id=fingerprint_id(fp or FINGERPRINT), date="2026-01-01T00:00:00+00:00",
    )


@pytest.fixture
def store(tmp_path) -> ProfileStore:
    return ProfileStore(tmp_path, FINGERPRINT)


def test_store_layout_and_fingerprint_file(store, tmp_path):
    assert store.directory == tmp_path / fingerprint_id(FINGERPRINT)
    data = json.loads((store.directory / "fingerprint.json").read_text())
    assert data["version"] == STORE_FORMAT_VERSION
    assert data["fingerprint_id"] == store.fingerprint_id
    assert data["fingerprint"] == FINGERPRINT
    assert not list(store.directory.glob("*.tmp"))
    assert ProfileStore.available(tmp_path) == {store.fingerprint_id: FINGERPRINT}


def test_layer_round_trip(store):
    m = make_measurement(1.5)
    store.add_layer(CONV, m, pass_index=1)
    records = store.layer_records()
    assert len(records) == 1
    record = records[0]
    assert record["version"] == STORE_FORMAT_VERSION
    assert record["kind"] == "layer"
    assert record["key"] == CONV.key()
    assert LayerSpec.from_dict(record["layer"]) == CONV
    assert record["pass"] == 1
    assert record["latency_ms"] == 1.5
    assert Measurement.from_dict(record["measurement"]) == m


def test_subnet_round_trip_and_filters(store):
    arch = {"depths": [1, 2], "widths": [8, 16], "expand_ratios": [], "resolution": 28}
    store.add_subnet("resnet", "hash_a", arch, [CONV, ADD], make_measurement(3.0), pass_index=0)
    store.add_subnet("resnet", "hash_a", arch, [CONV, ADD], make_measurement(3.1), pass_index=0, source="search")
    store.add_subnet("resnet", "hash_b", arch, [CONV], make_measurement(2.0), pass_index=0)

    assert len(store.subnet_records()) == 3
    assert len(store.subnet_records(space_hash="hash_a")) == 2
    assert len(store.subnet_records(space_hash="hash_a", source="profile")) == 1
    assert len(store.subnet_records(source="search")) == 1
    record = store.subnet_records(space_hash="hash_b")[0]
    assert record["arch"] == arch
    assert [LayerSpec.from_dict(d) for d in record["layers"]] == [CONV]
    assert record["space"] == "resnet"


def test_records_filtered_by_batch_size(store):
    store.add_layer(CONV, make_measurement(1.0, batch_size=1), 0)
    store.add_layer(CONV, make_measurement(3.0, batch_size=4), 0)
    store.add_layer(CONV, make_measurement(3.4, batch_size=4), 1)
    assert len(store.layer_records()) == 3
    assert [r["latency_ms"] for r in store.layer_records(batch_size=1)] == [1.0]
    assert store.layer_table(batch_size=4) == {CONV.key(): pytest.approx(3.2)}
    assert store.layer_table(batch_size=8) == {}


def test_records_filtered_by_threads(tmp_path):
    two_threads = ProfileStore(tmp_path, FINGERPRINT)
    one_thread = ProfileStore(tmp_path, {**FINGERPRINT, "threads": 1})
    assert one_thread.directory == two_threads.directory
    two_threads.add_layer(CONV, make_measurement(1.0, threads=2), 0)
    one_thread.add_layer(CONV, make_measurement(1.8, threads=1), 0)
    assert [r["latency_ms"] for r in two_threads.layer_records()] == [1.0]
    assert [r["latency_ms"] for r in one_thread.layer_records()] == [1.8]


def test_other_device_measurement_rejected(store):
    other = {**FINGERPRINT, "cpu_model": "Other CPU"}
    with pytest.raises(StoreError, match="cannot go into store"):
        store.add_layer(CONV, make_measurement(1.0, fp=other), 0)
    assert ProfileStore(store.root, other).directory != store.directory


def test_truncated_last_line_ignored_and_repaired(tmp_path, caplog):
    store = ProfileStore(tmp_path, FINGERPRINT)
    store.add_layer(CONV, make_measurement(1.0), 0)
    with open(store.layers_path, "a", encoding="utf-8") as handle:
        handle.write('{"version": 1, "kind": "layer", "key": "trunc')

    with caplog.at_level(logging.WARNING, logger="predictors.store"):
        records = store.layer_records()
    assert len(records) == 1
    assert "truncated last line" in caplog.text

    reopened = ProfileStore(tmp_path, FINGERPRINT)
    reopened.add_layer(ADD, make_measurement(0.5), 0)
    assert [r["key"] for r in reopened.layer_records()] == [CONV.key(), ADD.key()]
    assert reopened.layers_path.read_text().endswith("\n")


def test_complete_last_line_without_newline_kept(tmp_path):
    store = ProfileStore(tmp_path, FINGERPRINT)
    store.add_layer(CONV, make_measurement(1.0), 0)
    store.layers_path.write_text(store.layers_path.read_text().rstrip("\n"))

    reopened = ProfileStore(tmp_path, FINGERPRINT)
    reopened.add_layer(ADD, make_measurement(0.5), 0)
    assert len(reopened.layer_records()) == 2


def test_wrong_version_rejected(store):
    store.add_layer(CONV, make_measurement(1.0), 0)
    record = json.loads(store.layers_path.read_text())
    record["version"] = 99
    with open(store.layers_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    with pytest.raises(StoreError, match="layers.jsonl line 2 has store format version 99"):
        store.layer_records()


def test_corrupt_middle_line_rejected(store):
    store.add_layer(CONV, make_measurement(1.0), 0)
    text = store.layers_path.read_text()
    store.layers_path.write_text("not json\n" + text)
    with pytest.raises(StoreError, match="line 1 is not valid JSON"):
        store.layer_records()


def test_wrong_fingerprint_file_version_rejected(store):
    path = store.directory / "fingerprint.json"
    data = json.loads(path.read_text())
    data["version"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="fingerprint.json has store format version 0"):
        ProfileStore(store.root, FINGERPRINT)


def test_noise_floor_hand_made(store):
    pairs = {"a": (10.0, 10.4), "b": (20.0, 21.5), "c": (30.0, 36.0), "d": (40.0, 40.0)}
    for name, (first, second) in pairs.items():
        arch = {"name": name}
        store.add_subnet("resnet", "h", arch, [CONV], make_measurement(first), 0)
        store.add_subnet("resnet", "h", arch, [CONV], make_measurement(second), 1)
    store.add_subnet("resnet", "h", {"name": "single"}, [CONV], make_measurement(5.0), 0)
    store.add_subnet("resnet", "h", {"name": "e"}, [CONV], make_measurement(1.0), 0, source="search")
    store.add_subnet("resnet", "h", {"name": "e"}, [CONV], make_measurement(9.0), 1, source="search")

    noise = store.noise_floor("h", batch_size=1)
    assert noise["n"] == 4
    assert noise["within_5pct"] == pytest.approx(0.5)
    assert noise["within_10pct"] == pytest.approx(0.75)
    assert noise["kendall_tau"] == pytest.approx(1.0)
    assert store.noise_floor("h", batch_size=4)["n"] == 0


def test_noise_floor_rank_disagreement():
    noise = noise_floor_from_pairs([(1.0, 2.0), (2.0, 1.0)])
    assert noise["kendall_tau"] == pytest.approx(-1.0)
    assert noise["within_10pct"] == 0.0
    empty = noise_floor_from_pairs([])
    assert empty["n"] == 0
    assert empty["kendall_tau"] is None
    assert noise_floor_from_pairs([(1.0, 1.05)])["kendall_tau"] is None

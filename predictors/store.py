"""The on-disk profile store: append-only JSON-lines files, one folder per device fingerprint.

Layout under ``root/<fingerprint_id>/``:

- ``fingerprint.json``: ``{"version", "fingerprint_id", "fingerprint"}``, written once, atomically.
- ``layers.jsonl``: one layer microbenchmark per line.
- ``subnets.jsonl``: one whole-subnet measurement per line.
- ``gated_blocks.jsonl``: one measurement of a residual block with dynamic gates at given kept
  counts per line (:mod:`predictors.gated`).

Every line is ``{"version", "kind", "key", "pass", "latency_ms", "measurement", "source", ...}``
plus ``"layer"`` (a LayerSpec dict) for layers, or ``"space"``, ``"space_hash"``, ``"arch"`` and
``"layers"`` for subnets, or ``"block"`` (the block's signature) and ``"run"`` (gate option, kept
channels and columns, grouped path) for gated blocks. ``latency_ms`` is the measurement's median in milliseconds per forward
pass of one batch. Each record is appended and flushed as soon as it exists, so a killed process
loses at most the line it was writing, and the reader skips such a truncated last line.

Records with different batch sizes, thread counts, dtypes and runtimes live in the same files,
and the protocol stored in each record distinguishes them. The readers return only the records
whose protocol matches the store's fingerprint on ``threads``, ``dtype`` and ``runtime``, and
the requested batch size if one is given.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from nas.files import exclusive_lock, write_json_atomic
from nas.spaces.layers import LayerSpec
from predictors.fingerprint import fingerprint_id, fingerprints_match
from predictors.profiling import Measurement

try:
    import fcntl
except ImportError:  # Windows has no fcntl; appends there are not locked.
    fcntl = None  # type: ignore[assignment]

__all__ = ["STORE_FORMAT_VERSION", "ProfileStore", "StoreError", "arch_key"]

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
# Protocol fields, besides batch size, that a record must share with the store's fingerprint.
_MATCHED_PROTOCOL_FIELDS = ("threads", "dtype", "runtime")


class StoreError(ValueError):
    """A profile store file that cannot be read or a record that does not belong in the store."""


def arch_key(arch: dict[str, Any]) -> str:
    """Return a stable string that identifies an architecture dict within one space."""
    return json.dumps(arch, sort_keys=True, separators=(",", ":"))


class ProfileStore:
    """Append-only latency records for one device fingerprint.

    Args:
        root: folder with one sub-folder per fingerprint id, created if missing.
        fingerprint: the device fingerprint from :func:`predictors.fingerprint.device_fingerprint`.
            Its ``threads``, ``dtype`` and ``runtime`` select the records that the readers return.

    Several processes may append to the same store because each append takes an exclusive file
    lock (on platforms with ``fcntl``). Readers reread the files on every call. Profiling runs
    take :meth:`profiling_lock` as well, one at a time per device.
    """

    def __init__(self, root: Path | str, fingerprint: dict[str, Any]) -> None:
        self.root = Path(root)
        self.fingerprint = dict(fingerprint)
        self._id = fingerprint_id(self.fingerprint)
        self.directory = self.root / self._id
        self.directory.mkdir(parents=True, exist_ok=True)
        self.layers_path = self.directory / "layers.jsonl"
        self.subnets_path = self.directory / "subnets.jsonl"
        self.gated_blocks_path = self.directory / "gated_blocks.jsonl"
        self._repaired: set[Path] = set()
        self._init_fingerprint_file()

    @property
    def fingerprint_id(self) -> str:
        """Twelve hex digits that name this store's folder."""
        return self._id

    def profiling_lock(self) -> Any:
        """Return a context manager that holds this device's profiling lock (see :func:`nas.files.exclusive_lock`).

        Runs that profile one device take it, so that they do not time each other's work.
        """
        return exclusive_lock(self.directory / "profiling.lock", "profiling this device")

    @staticmethod
    def available(root: Path | str) -> dict[str, dict[str, Any]]:
        """Return the fingerprint of every store under ``root``, keyed by fingerprint id."""
        found = {}
        for path in sorted(Path(root).glob("*/fingerprint.json")):
            data = _load_fingerprint_file(path)
            found[data["fingerprint_id"]] = data["fingerprint"]
        return found

    # -- writing -----------------------------------------------------------------------------

    def add_layer(self, spec: LayerSpec, m: Measurement, pass_index: int) -> None:
        """Append one layer microbenchmark taken in pass ``pass_index``."""
        self._add(self.layers_path, "layer", spec.key(), {"layer": spec.to_dict()}, m, pass_index, "profile")

    def add_subnet(
        self,
        space_name: str,
        space_hash: str,
        arch: dict[str, Any],
        layers: list[LayerSpec],
        m: Measurement,
        pass_index: int,
        source: str = "profile",
    ) -> None:
        """Append one whole-subnet measurement.

        Args:
            source: ``"profile"`` for :func:`predictors.profiling.profile_space`, ``"search"`` for
                measurements taken while a search runs.
        """
        fields = {"space": space_name, "space_hash": space_hash, "arch": arch,
                  "layers": [layer.to_dict() for layer in layers]}
        self._add(self.subnets_path, "subnet", arch_key(arch), fields, m, pass_index, source)

    def add_gated_block(self, key: str, block: dict[str, Any], run: dict[str, Any], m: Measurement,
                        pass_index: int, source: str = "profile") -> None:
        """Append one gated-block measurement (see :func:`predictors.gated.profile_gated_blocks`).

        Args:
            key: identifies the block and run, so a resumed profile skips what is stored.
            block: the block's signature (type, input shape and stage convolutions).
            run: the gate option, kept channels and columns, and whether the grouped path ran.
            source: ``"profile"`` for ``python -m predictors.profile``, ``"train"`` for the runs
                that ``train.py`` takes for ``gates.latency_budget_ms``.
        """
        self._add(self.gated_blocks_path, "gated_block", key, {"block": block, "run": run}, m, pass_index, source)

    def _add(self, path: Path, kind: str, key: str, fields: dict[str, Any], m: Measurement, pass_index: int,
             source: str) -> None:
        """Append one record of ``kind``: the common keys around the kind's own ``fields``."""
        self._check_measurement(m)
        record = {
            "version": STORE_FORMAT_VERSION,
            "kind": kind,
            "key": key,
            **fields,
            "pass": int(pass_index),
            "latency_ms": m.median_ms,
            "measurement": m.to_dict(),
            "source": source,
        }
        self._append(path, record)

    def _check_measurement(self, m: Measurement) -> None:
        if m.fingerprint_id != self._id:
            raise StoreError(
                f"Measurement taken on device {m.fingerprint_id} cannot go into store {self._id} "
                f"({self.directory}); open the store with the fingerprint of the measuring device."
            )

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with open(path, "a+", encoding="utf-8") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            if path not in self._repaired:
                _repair_tail(handle, path)
                self._repaired.add(path)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _init_fingerprint_file(self) -> None:
        path = self.directory / "fingerprint.json"
        if path.exists():
            stored = _load_fingerprint_file(path)["fingerprint"]
            same, differing = fingerprints_match(stored, self.fingerprint)
            if not same:
                raise StoreError(
                    f"{path} describes another device (fields {differing} differ) although its folder "
                    f"name is {self._id}; the file was edited or copied, so move that folder away."
                )
            return
        payload = {"version": STORE_FORMAT_VERSION, "fingerprint_id": self._id, "fingerprint": self.fingerprint}
        write_json_atomic(path, payload, indent=2, sort_keys=True)

    # -- reading -----------------------------------------------------------------------------

    def layer_records(self, batch_size: int | None = None) -> list[dict[str, Any]]:
        """Return the layer records that match this store's protocol fields and ``batch_size``."""
        return [r for r in _read_jsonl(self.layers_path, "layer") if self._matches(r, batch_size)]

    def subnet_records(
        self,
        space_hash: str | None = None,
        batch_size: int | None = None,
        source: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return the subnet records that match this store's protocol fields and every filter given."""
        out = []
        for record in _read_jsonl(self.subnets_path, "subnet"):
            if space_hash is not None and record.get("space_hash") != space_hash:
                continue
            if source is not None and record.get("source") != source:
                continue
            if self._matches(record, batch_size):
                out.append(record)
        return out

    def gated_block_records(self, batch_size: int | None = None) -> list[dict[str, Any]]:
        """Return the gated-block records that match this store's protocol fields and ``batch_size``."""
        return [r for r in _read_jsonl(self.gated_blocks_path, "gated_block") if self._matches(r, batch_size)]

    def layer_table(self, batch_size: int) -> dict[str, float]:
        """Map ``LayerSpec.key()`` to the median over passes of each pass's median latency, in ms."""
        by_key: dict[str, list[float]] = defaultdict(list)
        for record in self.layer_records(batch_size):
            by_key[record["key"]].append(float(record["latency_ms"]))
        return {key: float(np.median(values)) for key, values in by_key.items()}

    def noise_floor(self, space_hash: str, batch_size: int) -> dict[str, Any]:
        """Measure how well two passes over the same subnets agree.

        Uses the profile-sourced subnets of ``space_hash`` that have at least two passes, and
        compares their two lowest pass indices. The relative difference of a pair ``a, b`` is
        ``|a - b| / ((a + b) / 2)``.

        Returns:
            ``n`` (subnets compared), ``within_10pct`` and ``within_5pct`` (share of subnets whose
            relative difference is at most 0.10 and 0.05), ``median_rel_diff``, and
            ``kendall_tau`` (rank agreement of the two passes over all compared subnets). Shares
            and medians are ``None`` when ``n`` is 0, and ``kendall_tau`` when ``n`` < 2.
        """
        passes: dict[str, dict[int, float]] = defaultdict(dict)
        for record in self.subnet_records(space_hash, batch_size, source="profile"):
            passes[record["key"]][int(record["pass"])] = float(record["latency_ms"])
        pairs = []
        for by_pass in passes.values():
            if len(by_pass) >= 2:
                first, second = sorted(by_pass)[:2]
                pairs.append((by_pass[first], by_pass[second]))
        return noise_floor_from_pairs(pairs)

    def _matches(self, record: dict[str, Any], batch_size: int | None) -> bool:
        protocol = record["measurement"]["protocol"]
        if batch_size is not None and protocol.get("batch_size") != batch_size:
            return False
        for name in _MATCHED_PROTOCOL_FIELDS:
            if name in self.fingerprint and protocol.get(name) != self.fingerprint[name]:
                return False
        return True


def noise_floor_from_pairs(pairs: Iterable[tuple[float, float]]) -> dict[str, Any]:
    """Summarise pass-to-pass agreement over ``(pass_a_ms, pass_b_ms)`` pairs; see ``ProfileStore.noise_floor``."""
    pairs = list(pairs)
    n = len(pairs)
    if n == 0:
        return {"n": 0, "within_10pct": None, "within_5pct": None, "median_rel_diff": None, "kendall_tau": None}

    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    relative = np.abs(a - b) / ((a + b) / 2.0)
    tau = None
    if n >= 2:
        statistic = stats.kendalltau(a, b).statistic
        tau = None if np.isnan(statistic) else float(statistic)
    return {
        "n": n,
        "within_10pct": float(np.mean(relative <= 0.10)),
        "within_5pct": float(np.mean(relative <= 0.05)),
        "median_rel_diff": float(np.median(relative)),
        "kendall_tau": tau,
    }


# -- file helpers ---------------------------------------------------------------------------


def _read_jsonl(path: Path, kind: str) -> list[dict[str, Any]]:
    """Read every record of ``path``; a truncated last line is skipped with a warning."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("Ignoring truncated last line %d of %s (%s); it is a record cut off mid-write.",
                               number, path, err)
                continue
            raise StoreError(
                f"{path} line {number} is not valid JSON ({err}); delete that line or the file."
            ) from err
        _check_record(record, path, number, kind)
        records.append(record)
    return records


def _check_record(record: Any, path: Path, number: int, kind: str) -> None:
    if not isinstance(record, dict):
        raise StoreError(f"{path} line {number} is not a JSON object; delete that line or the file.")
    version = record.get("version")
    if version != STORE_FORMAT_VERSION:
        raise StoreError(
            f"{path} line {number} has store format version {version!r}, but this TailNAS reads version "
            f"{STORE_FORMAT_VERSION}; use a matching TailNAS version or profile again into a new work dir."
        )
    if record.get("kind") != kind:
        raise StoreError(
            f"{path} line {number} has kind {record.get('kind')!r}, but this file contains only {kind!r} "
            "records; move that line to the matching file or delete it."
        )


def _repair_tail(handle: Any, path: Path) -> None:
    """Make sure the file ends with a newline before appending, cutting off a truncated record."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if size == 0:
        return
    handle.seek(0)
    text = handle.read()
    if text.endswith("\n"):
        return
    start = text.rfind("\n") + 1
    try:
        json.loads(text[start:])
    except json.JSONDecodeError:
        logger.warning("Removing a truncated last record from %s before appending.", path)
        handle.truncate(len(text[:start].encode("utf-8")))
        return
    handle.write("\n")


def _load_fingerprint_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise StoreError(f"Cannot read {path} ({err}); delete the file and profile again.") from err
    if not isinstance(data, dict) or data.get("version") != STORE_FORMAT_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise StoreError(
            f"{path} has store format version {version!r}, but this TailNAS reads version "
            f"{STORE_FORMAT_VERSION}; use a matching TailNAS version or profile again into a new work dir."
        )
    return data

"""Per-batch choice of the path on which a channel-gated residual block runs a batch above 1, from measured costs.

A block that keeps ``k`` of its ``C`` inner channels per image can serve a batch in three ways:

* grouped: one grouped convolution with the batch as groups, each image running its own ``k``
  channels. Its cost depends on ``k`` only.
* gathered: the union of the batch's selections, ``u`` channels with ``k <= u <= C``, computed
  for every image, then each image's dropped channels zeroed. Its cost depends on ``u``.
* dense: all ``C`` channels, then the same zeroing.

Which is fastest depends on the block and on the batch. On the development CPU at batch 32, a
fine-tuned 7x7 block keeping 40 of 96 channels ran grouped slower than dense, while on a narrow
subnet gathering a union of overlapping selections beat grouping. :class:`BatchPathCosts` holds
the block's measured times of both paths, and :meth:`BatchPathCosts.choose` picks the cheaper one
for the union that each batch actually has.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any
from collections.abc import Mapping

__all__ = ["BatchPathCosts", "BatchPath"]

# The three ways to serve a batch above 1: "grouped", "gathered" or "dense".
BatchPath = str


def _ms_table(name: str, values: Mapping[Any, Any]) -> dict[int, float]:
    table = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must map channel counts to milliseconds, but got {key!r}: {value!r}.")
        try:
            count, ms = int(key), float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must map channel counts to milliseconds, but got {key!r}: {value!r}.") from None
        if count < 1 or str(key).strip() != str(count) or not math.isfinite(ms) or ms <= 0:
            raise ValueError(f"{name} must map channel counts >= 1 to finite milliseconds > 0, "
                             f"but got {key!r}: {value!r}.")
        table[count] = ms
    return dict(sorted(table.items()))


@dataclasses.dataclass(frozen=True)
class BatchPathCosts:
    """Measured latency (ms) of one channel-gated block at ``batch_size``, per path.

    Attributes:
        batch_size: the batch size of the measurements (the largest of ``gates.measure_batch_sizes``).
        grouped: per kept count, the grouped path.
        gathered: per union width, the gathered path; the largest width is the block's inner
            channel count, where the entry is the dense path.
    """

    batch_size: int
    grouped: dict[int, float]
    gathered: dict[int, float]

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, but got {self.batch_size!r}.")
        object.__setattr__(self, "grouped", _ms_table("grouped", self.grouped))
        object.__setattr__(self, "gathered", _ms_table("gathered", self.gathered))
        if not self.gathered:
            raise ValueError("gathered must time at least the dense path (the block's inner channel count).")
        object.__setattr__(self, "_widths", list(self.gathered))
        object.__setattr__(self, "_counts", list(self.grouped))
        # Kept counts whose grouping beats every path a union could take: their batches group
        # without computing the union.
        dense_ms = self.gathered[self.channels]
        always = set()
        for count, grouped_ms in self.grouped.items():
            cheapest = min([dense_ms, *(ms for width, ms in self.gathered.items() if width >= count)])
            if grouped_ms < cheapest:
                always.add(count)
        object.__setattr__(self, "_always_grouped", frozenset(always))

    @property
    def channels(self) -> int:
        """The block's inner channel count: the widest gathered entry, which is the dense path."""
        return self._widths[-1]

    def always_grouped(self, kept: int) -> bool:
        """Return whether a batch keeping ``kept`` channels per image groups whatever its union, as
        :meth:`choose` would decide; such batches need not compute their union."""
        at = bisect.bisect_left(self._counts, kept)
        return at < len(self._counts) and self._counts[at] in self._always_grouped

    def choose(self, kept: int, union: int) -> BatchPath:
        """Return the cheaper path for a batch keeping ``kept`` channels per image with ``union`` in all.

        A union between two measured widths costs what the next wider one does, and so does a kept
        count between two measured counts. Gathering at the full width is the dense path, and a
        union whose gathering was measured no faster than that runs dense too.
        """
        widths, counts = self._widths, self._counts
        width = widths[min(bisect.bisect_left(widths, union), len(widths) - 1)]
        dense_ms = self.gathered[self.channels]
        path, best_ms = ("gathered", self.gathered[width]) if self.gathered[width] < dense_ms else ("dense", dense_ms)
        at = bisect.bisect_left(counts, kept)
        if at < len(counts) and self.grouped[counts[at]] < best_ms:
            return "grouped"
        return path

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size,
                "grouped": {str(k): v for k, v in self.grouped.items()},
                "gathered": {str(k): v for k, v in self.gathered.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchPathCosts:
        keys = {"batch_size", "grouped", "gathered"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"batch path costs must be a mapping with keys {sorted(keys)}, but got {data!r}.")
        if not isinstance(data["grouped"], Mapping) or not isinstance(data["gathered"], Mapping):
            raise ValueError(f"grouped and gathered must be mappings of channel counts to milliseconds, but got {data!r}.")
        return cls(data["batch_size"], dict(data["grouped"]), dict(data["gathered"]))

"""BatchNorm running statistics per keep ratio, for gated networks that serve a range of ratios.

A gate that drops channels or columns changes the distribution of every map computed after it,
so BatchNorm statistics estimated at one keep ratio are wrong at another. The affine weights are
trained across the range and stay shared; only ``running_mean`` and ``running_var`` are stored
per ratio of a grid. :func:`nas.gates.training.calibrate_keep_ratios` fills the bank, and
:meth:`nas.gates.GatedNetwork.set_keep_ratio` loads the statistics of the nearest grid ratio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nas.gates.config import GateConfigError

__all__ = ["BatchNormBank", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Return the BatchNorm layers of ``model`` by module path, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class _RatioStats(nn.Module):
    """Running statistics of one BatchNorm layer, one row per grid ratio: (ratios, channels) each."""

    def __init__(self, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("running_mean", running_mean)
        self.register_buffer("running_var", running_var)


class BatchNormBank(nn.Module):
    """Running statistics of some BatchNorm layers at a grid of keep ratios.

    The state dict contains ``ratios`` (G,) and ``stats.<i>.running_mean`` and ``stats.<i>.running_var``
    of shape (G, C_i) for the i-th path of ``paths``. :meth:`to_record` gives what a rebuild needs
    to create the same buffers before ``load_state_dict``.

    Args:
        paths: module paths of the BatchNorm layers, relative to the model they belong to.
        channels: number of features of each layer.
        ratios: the grid of keep ratios, ascending, without duplicates.
    """

    def __init__(self, paths: Sequence[str], channels: Sequence[int], ratios: Sequence[float]) -> None:
        super().__init__()
        grid = [float(r) for r in ratios]
        if not grid or sorted(set(grid)) != grid:
            raise GateConfigError(f"BatchNorm calibration ratios must be ascending and distinct, but got {grid}.")
        if len(paths) != len(channels):
            raise GateConfigError(f"BatchNormBank got {len(paths)} paths but {len(channels)} channel counts.")
        self.paths = list(paths)
        self.register_buffer("ratios", torch.tensor(grid, dtype=torch.float64))
        self.stats = nn.ModuleList(
            _RatioStats(torch.zeros(len(grid), c), torch.ones(len(grid), c)) for c in channels
        )

    @property
    def grid(self) -> list[float]:
        """The keep ratios that have their own statistics, ascending."""
        return self.ratios.tolist()

    def nearest(self, ratio: float) -> int:
        """Return the grid index nearest to ``ratio``; a tie goes to the larger ratio.

        Distances are rounded to 6 decimals, so that a ratio midway between two grid ratios ties
        whatever the floating-point error of the grid. For example, 0.35 + 0.1 is not exactly 0.45,
        and float32 copies of the ratios differ from them in the eighth digit.
        """
        grid = self.grid
        return min(range(len(grid)), key=lambda i: (round(abs(grid[i] - ratio), 6), -grid[i]))

    @torch.no_grad()
    def store(self, index: int, model: nn.Module) -> None:
        """Copy the current running statistics of the bank's layers in ``model`` into row ``index``."""
        for path, stats in zip(self.paths, self.stats):
            norm = self._layer(model, path)
            stats.running_mean[index].copy_(norm.running_mean)
            stats.running_var[index].copy_(norm.running_var)

    @torch.no_grad()
    def load(self, index: int, model: nn.Module) -> None:
        """Copy row ``index`` into the running statistics of the bank's layers in ``model``.

        Every layer is looked up before any is written, so a folded layer raises with nothing changed.
        """
        norms = [self._layer(model, path) for path in self.paths]
        for norm, stats in zip(norms, self.stats):
            norm.running_mean.copy_(stats.running_mean[index])
            norm.running_var.copy_(stats.running_var[index])

    @staticmethod
    def _layer(model: nn.Module, path: str) -> nn.modules.batchnorm._BatchNorm:
        norm = model.get_submodule(path)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_mean is None:
            raise GateConfigError(
                f"Per-keep-ratio statistics belong to the BatchNorm at {path!r}, but the model has "
                f"{type(norm).__name__} there (BatchNorm folded or replaced). Set the keep ratio before folding."
            )
        return norm

    def to_record(self) -> dict[str, Any]:
        """Return the JSON-serialisable shape of the bank: grid ratios, layer paths and channel counts."""
        return {"ratios": self.grid, "paths": list(self.paths),
                "channels": [int(stats.running_mean.shape[1]) for stats in self.stats]}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> BatchNormBank:
        """Build a bank with the shape of a :meth:`to_record` record; ``load_state_dict`` fills the values."""
        missing = sorted({"ratios", "paths", "channels"} - set(record))
        if missing:
            raise GateConfigError(f"The gate record's batchnorm_stats lacks keys {missing}; got {dict(record)!r}.")
        return cls(record["paths"], [int(c) for c in record["channels"]], record["ratios"])

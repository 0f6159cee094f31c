"""The supernet interface shared by all space families."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

__all__ = ["Supernet", "copy_sliced_state"]


class Supernet(nn.Module, ABC):
    """A weight-sharing network whose active subnet is chosen with :meth:`set_active`.

    Call order: ``set_active(arch)`` then ``forward(x)`` any number of times. The active subnet
    stays until the next ``set_active``. :meth:`extract` returns a standalone module with the
    inherited weights that gives the same outputs as the supernet in that configuration.
    """

    def __init__(self, space: Any) -> None:
        super().__init__()
        self.space = space
        self.active_arch: Any = None

    @abstractmethod
    def set_active(self, arch: Any) -> None:
        """Activate ``arch``; raises :class:`nas.spaces.SpaceError` if it is outside the space."""

    @abstractmethod
    def build_static(self, arch: Any) -> nn.Module:
        """Build the plain (non-elastic) module for ``arch``, with freshly initialised weights."""

    def extract(self, arch: Any) -> nn.Module:
        """Return the subnet ``arch`` as a standalone module carrying the inherited weights."""
        self.space.validate(arch)
        static = self.build_static(arch)
        static.load_state_dict(copy_sliced_state(self.state_dict(), static.state_dict(), self.kernel_transforms(arch)))
        return static.train(self.training)

    def kernel_transforms(self, arch: Any) -> dict[str, Any]:
        """Map from parameter name to a function that turns the supernet tensor into the subnet's.

        Families with elastic kernel sizes override this; by default every tensor is sliced to its
        leading channels.
        """
        return {}


def copy_sliced_state(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], transforms: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Fill ``target``'s tensors with the leading slices of ``source``'s tensors of the same name."""
    transforms = transforms or {}
    out = {}
    for name, tensor in target.items():
        if name not in source:
            raise KeyError(f"Subnet tensor {name!r} has no counterpart in the supernet state.")
        value = source[name]
        if name in transforms:
            value = transforms[name](value)
        if value.dim() != tensor.dim():
            raise ValueError(f"Tensor {name!r}: supernet has shape {tuple(value.shape)}, subnet {tuple(tensor.shape)}.")
        index = tuple(slice(0, size) for size in tensor.shape)
        out[name] = value[index].clone()
    return out

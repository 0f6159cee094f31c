"""Layer descriptions: the seam between search spaces and latency prediction.

A search space turns an architecture into a list of :class:`LayerSpec`. Profiling, features and
the predictor see only these descriptions, so a new space family needs no change in ``predictors``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["LayerSpec", "LAYER_OPS", "ACTIVATIONS", "conv_out_size"]

# Operators a LayerSpec can describe. Each one is a unit that a subnet really runs:
# "conv" is a convolution followed by BatchNorm and an optional activation (fused at inference),
# "add" is a residual addition followed by an optional activation,
# "se" is squeeze-and-excitation (pool, reduce conv, act, expand conv, hard sigmoid, multiply),
# "maxpool" is a max pooling, "gap" is global average pooling and "linear" is a fully connected layer.
LAYER_OPS = ("conv", "add", "se", "maxpool", "gap", "linear")
ACTIVATIONS = ("none", "relu", "hswish")


def conv_out_size(size: int, kernel_size: int, stride: int, padding: int | None = None) -> int:
    """Return the output height (or width) of a convolution with "same" padding by default."""
    if padding is None:
        padding = kernel_size // 2
    return (size + 2 * padding - kernel_size) // stride + 1


@dataclass(frozen=True)
class LayerSpec:
    """One unit of a subnet, as the device runs it.

    Sizes are square feature maps: ``in_size`` is the input height and width in pixels.
    For "linear" layers ``in_size`` is 1. ``batch_size`` is not part of a layer: the profiler
    and predictor take it from the measurement protocol. ``bias`` says whether a "linear" layer
    adds a bias vector; other ops keep the default ``True``, and :meth:`to_dict` and :meth:`key`
    leave it out while it has that default, so records written before the field existed still match.
    """

    op: str
    in_channels: int
    out_channels: int
    in_size: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    act: str = "none"
    bias: bool = True

    def __post_init__(self) -> None:
        if self.op not in LAYER_OPS:
            raise ValueError(f"LayerSpec.op must be one of {LAYER_OPS}, but got {self.op!r}.")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"LayerSpec.act must be one of {ACTIVATIONS}, but got {self.act!r}.")
        if min(self.in_channels, self.out_channels, self.in_size, self.kernel_size, self.stride, self.groups) < 1:
            raise ValueError(f"LayerSpec fields must be positive, but got {self}.")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels and out_channels in {self}.")
        if not isinstance(self.bias, bool):
            raise ValueError(f"LayerSpec.bias must be true or false, but got {self.bias!r}.")
        if not self.bias and self.op != "linear":
            raise ValueError(
                f"LayerSpec.bias=False applies only to op='linear', but got op={self.op!r}; "
                "a 'conv' unit's BatchNorm supplies its bias."
            )

    @property
    def out_size(self) -> int:
        """Output height and width in pixels."""
        if self.op == "conv":
            return conv_out_size(self.in_size, self.kernel_size, self.stride)
        if self.op == "maxpool":
            return conv_out_size(self.in_size, self.kernel_size, self.stride)
        if self.op in ("gap", "linear"):
            return 1
        return self.in_size

    @property
    def macs(self) -> int:
        """Multiply-accumulates for one input image."""
        if self.op == "conv":
            per_pixel = self.kernel_size**2 * (self.in_channels // self.groups) * self.out_channels
            return per_pixel * self.out_size**2
        if self.op == "linear":
            return self.in_channels * self.out_channels
        if self.op == "se":
            # Two 1x1 convolutions on the pooled vector, plus the rescaling multiply.
            return 2 * self.in_channels * self.out_channels + self.in_channels * self.in_size**2
        return 0

    @property
    def params(self) -> int:
        """Trainable parameters, BatchNorm's affine weights included, as PyTorch counts them."""
        if self.op == "conv":
            weights = self.kernel_size**2 * (self.in_channels // self.groups) * self.out_channels
            return weights + 2 * self.out_channels
        if self.op == "linear":
            return self.in_channels * self.out_channels + (self.out_channels if self.bias else 0)
        if self.op == "se":
            # reduce conv (with bias) and expand conv (with bias)
            return 2 * self.in_channels * self.out_channels + self.in_channels + self.out_channels
        return 0

    @property
    def input_elements(self) -> int:
        """Elements of one image's input tensor."""
        return self.in_channels * self.in_size**2

    @property
    def output_elements(self) -> int:
        """Elements of one image's output tensor."""
        if self.op in ("add", "se"):
            return self.in_channels * self.in_size**2
        return self.out_channels * self.out_size**2

    def key(self) -> str:
        """Return a stable string that identifies this layer in lookup tables and profile stores."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a dict, without ``bias`` while it has its default ``True``."""
        out = dataclasses.asdict(self)
        if out["bias"]:
            del out["bias"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown LayerSpec keys {unknown}; allowed keys are {sorted(names)}.")
        return cls(**data)

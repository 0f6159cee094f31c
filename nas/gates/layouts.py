"""Gateable block types: where a block's gated map lies, which class wraps it, and runtime settings.

A block type becomes gateable through :func:`register_block_layout`. Basic and bottleneck blocks
of ``nas.supernet.resnet`` are registered here, and MobileNetV3's inverted residual block in
``nas.gates.inverted``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from nas.supernet.resnet import BasicBlock, Bottleneck

if TYPE_CHECKING:
    from nas.gates.blocks import GatedResidualBlock

__all__ = ["BlockLayout", "GateRuntime", "block_layout", "gated_block_class", "register_block_layout"]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Position of the gated map in a residual block class.

    Attributes:
        stages: (conv, batch norm, activation or None) child names, in order; the last stage is the
            consumer and ends the residual branch.
        producer: index in ``stages`` of the convolution that makes the gated map. Stages between
            the producer and the consumer must act per channel (depthwise convolutions), which
            only gated classes such as ``GatedInvertedResidual`` accept.
        final_act: child name of the activation after the residual addition, or None when the sum
            has no activation.
        squeeze_excite: child name of a squeeze-and-excitation module between the gated map and
            the consumer, or None.
    """

    stages: tuple[tuple[str, str, str | None], ...]
    producer: int
    final_act: str | None
    squeeze_excite: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.producer < len(self.stages) - 1:
            raise ValueError(
                f"BlockLayout.producer must index a stage before the last (consumer), so lie in "
                f"[0, {len(self.stages) - 2}], but got {self.producer}."
            )
        if self.stages[self.producer][2] is None:
            raise ValueError(f"The producer stage {self.stages[self.producer]} needs an activation child name.")


_LAYOUTS: dict[type[nn.Module], BlockLayout] = {
    BasicBlock: BlockLayout((("conv1", "bn1", "act1"), ("conv2", "bn2", None)), producer=0, final_act="act2"),
    Bottleneck: BlockLayout(
        (("conv1", "bn1", "act1"), ("conv2", "bn2", "act2"), ("conv3", "bn3", None)), producer=1, final_act="act3"
    ),
}


_GATED_CLASSES: dict[type[nn.Module], type[GatedResidualBlock]] = {}


def register_block_layout(block_type: type[nn.Module], layout: BlockLayout,
                          gated_class: type[GatedResidualBlock] | None = None) -> None:
    """Make residual blocks of exactly ``block_type`` gateable with ``layout``, wrapped by ``gated_class``.

    ``gated_class`` defaults to :class:`GatedResidualBlock`, which needs the producer just before
    the consumer; blocks with depthwise stages between them need ``GatedInvertedResidual``.
    """
    _LAYOUTS[block_type] = layout
    if gated_class is not None:
        _GATED_CLASSES[block_type] = gated_class
    else:
        _GATED_CLASSES.pop(block_type, None)


def gated_block_class(module: nn.Module) -> type[GatedResidualBlock]:
    """Return the gated class that wraps blocks of ``module``'s exact type (``GatedResidualBlock`` by default)."""
    from nas.gates.blocks import GatedResidualBlock

    return _GATED_CLASSES.get(type(module), GatedResidualBlock)


def registered_block_types() -> list[str]:
    """Return the names of the block classes that have a layout, sorted."""
    return sorted(block_type.__name__ for block_type in _LAYOUTS)


def block_layout(module: nn.Module) -> BlockLayout | None:
    """Return the layout of a gateable block class (exact type match), or None."""
    return _LAYOUTS.get(type(module))


@dataclasses.dataclass
class GateRuntime:
    """Settings shared by every gated block of one network; the network changes them in place.

    Attributes:
        mode: eval-time path, "mask" or "skip".
        skip_max_share: at batches above 1, the union of the images' selections is gathered only when
            at most this share of the inner-convolution MACs remains. Otherwise the block runs dense and masks.
        dropout_fraction: share of lowest-scoring features that targeted dropout may drop.
        dropout_rate: drop probability of each candidate.
        generator: generator of the dropout noise, created on first use on the input's device.
        seed: seed of ``generator``.
        mac_counter: while set, eval paths add the MACs they run to ``mac_counter[0]``.
    """

    mode: str = "skip"
    skip_max_share: float = 0.75
    dropout_fraction: float = 0.0
    dropout_rate: float = 0.0
    seed: int = 0
    generator: torch.Generator | None = None
    mac_counter: list[int] | None = None

    def dropout_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

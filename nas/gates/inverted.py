"""Gates on the expanded channels of MobileNetV3 inverted residual blocks.

The block is expand 1x1 (producer), depthwise kxk with the stride, squeeze-and-excitation (SE),
project 1x1 (consumer). The gated map is the depthwise output after its activation, before SE:

* a dropped channel is zero where SE pools, so SE's squeeze reads only kept channels. Skip mode
  slices the depthwise filters, the SE reduce inputs and the SE expand outputs with the same
  channel index as the producer and consumer.
* a kept output column of the depthwise convolution reads a window of ``k`` expanded columns
  starting at ``column * stride - padding``. Skip mode computes the expand convolution on the
  input columns those windows read, each once. Window positions outside the map are zeroed after
  the expand activation, because the depthwise padding pads the expanded map, not the block input.
  With stride 1 and a 7x7 kernel, a few kept columns already read most input columns, so column
  gates save little of the expand convolution there.

Training masks the same map with the block's own modules, so a keep ratio of 1.0 is the ungated
block, as for residual blocks (:mod:`nas.gates.blocks`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nas.gates.blocks import BlockLayout, GatedResidualBlock, register_block_layout
from nas.gates.folding import fold_conv_batchnorm
from nas.supernet.mobilenet import InvertedResidual, SqueezeExcite

__all__ = ["INVERTED_RESIDUAL_LAYOUT", "GatedInvertedResidual"]

INVERTED_RESIDUAL_LAYOUT = BlockLayout(
    (("conv_pw", "bn1", "act1"), ("conv_dw", "bn2", "act2"), ("conv_pwl", "bn3", None)),
    producer=0, final_act=None, squeeze_excite="se",
)


class GatedInvertedResidual(GatedResidualBlock):
    """An inverted residual block whose expanded channels (and depthwise output columns) are gated.

    The block input is added to the output when the wrapped block's ``residual`` is true, with no
    activation after the sum. Arguments are those of :class:`GatedResidualBlock`; ``in_width`` is
    the block input's width, and the gated map is the depthwise output, ``stride`` times narrower.
    """

    def _shortcut_children(self) -> list[str]:
        return []

    @classmethod
    def supports_channel_path(cls, layout: BlockLayout) -> bool:
        # The depthwise stage between producer and consumer needs the general eval path.
        return False

    def _adopt_children(self, block: nn.Module) -> None:
        super()._adopt_children(block)
        self.residual = bool(getattr(block, "residual", False))
        self.downsample = None

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor | None:
        return x if self.residual else None

    def _check_convs(self, producer: nn.Module, consumer: nn.Module) -> None:
        if len(self.layout.stages) != 3 or self.layout.producer != 0:
            raise ValueError(f"{type(self).__name__} needs stages (expand, depthwise, project), but got "
                             f"{self.layout.stages} with producer {self.layout.producer}.")
        self._check_dense(producer, consumer)
        depthwise = self._stage_modules(1)[0]
        channels = producer.out_channels
        shape_ok = isinstance(depthwise, nn.Conv2d) and depthwise.groups == channels == depthwise.out_channels
        if not shape_ok or depthwise.dilation != (1, 1) or depthwise.padding[1] != depthwise.kernel_size[1] // 2:
            raise ValueError(f"The middle stage must be a depthwise nn.Conv2d over the {channels} expanded channels "
                             f"with 'same' padding and no dilation, but got {depthwise}.")
        if producer.kernel_size != (1, 1) or producer.stride != (1, 1) or consumer.kernel_size != (1, 1):
            raise ValueError(f"The expand and project convolutions must be 1x1 with stride 1, but got {producer} "
                             f"and {consumer}.")
        se = getattr(self, self.layout.squeeze_excite)
        if not isinstance(se, (SqueezeExcite, nn.Identity)):
            raise ValueError(f"The squeeze-and-excitation child must be SqueezeExcite or nn.Identity, but got "
                             f"{type(se).__name__}.")

    # -- eval paths -----------------------------------------------------------------------------
    def _fold_source_modules(self) -> list[nn.Module]:
        depthwise, bn, _ = self._stage_modules(1)
        se = getattr(self, self.layout.squeeze_excite)
        return [*super()._fold_source_modules(), depthwise, bn, *se.modules()]

    def _fold_weights(self) -> dict[str, torch.Tensor]:
        weights = super()._fold_weights()
        depthwise, bn, _ = self._stage_modules(1)
        weights["depthwise_w"], weights["depthwise_b"] = fold_conv_batchnorm(depthwise, bn)
        se = getattr(self, self.layout.squeeze_excite)
        if isinstance(se, SqueezeExcite):
            weights["se_reduce_w"] = se.conv_reduce.weight.detach().flatten(1)
            weights["se_reduce_b"] = se.conv_reduce.bias.detach()
            weights["se_expand_w"] = se.conv_expand.weight.detach().flatten(1)
            weights["se_expand_b"] = se.conv_expand.bias.detach()
        return weights

    def _produce_gathered(self, inner: torch.Tensor, weights: dict[str, torch.Tensor],
                          channel_index: torch.Tensor | None, column_index: torch.Tensor | None) -> torch.Tensor:
        """Compute the depthwise output's kept channels at its kept columns: (N, u_channels, H_out, u_columns)."""
        expand_act = self._stage_modules(0)[2]
        depthwise, _, depthwise_act = self._stage_modules(1)
        expand_w, expand_b = weights["producer_w"], weights["producer_b"]
        depthwise_w, depthwise_b = weights["depthwise_w"], weights["depthwise_b"]
        if channel_index is not None:
            expand_w, expand_b = expand_w.index_select(0, channel_index), expand_b.index_select(0, channel_index)
            depthwise_w = depthwise_w.index_select(0, channel_index)
            depthwise_b = depthwise_b.index_select(0, channel_index)
        groups = depthwise_w.shape[0]
        if column_index is None:
            hidden = expand_act(self._conv(inner, expand_w, expand_b, 1, 0))
            return depthwise_act(self._conv(hidden, depthwise_w, depthwise_b, depthwise.stride, depthwise.padding,
                                            groups))

        # The expand convolution runs once on each input column that some window reads. Then the
        # k-wide window of every kept output column is laid side by side, and the depthwise kernel
        # slides with a column stride of its own width, so each window yields one output column.
        taps, pad, stride = depthwise.kernel_size[1], depthwise.padding[1], depthwise.stride[1]
        width = inner.shape[3]
        offsets = torch.arange(taps, device=inner.device)
        positions = (column_index[:, None] * stride + offsets - pad).reshape(-1)
        inside = (positions >= 0) & (positions < width)
        needed, window_index = torch.unique(positions.clamp(0, width - 1), return_inverse=True)
        expanded = expand_act(self._conv(inner.index_select(3, needed), expand_w, expand_b, 1, 0))
        hidden = expanded.index_select(3, window_index) * inside.to(expanded.dtype)
        return depthwise_act(self._conv(hidden, depthwise_w, depthwise_b, (depthwise.stride[0], taps),
                                        (depthwise.padding[0], 0), groups))

    def _after_gated_map(self, hidden: torch.Tensor, weights: dict[str, torch.Tensor],
                         channel_index: torch.Tensor | None) -> torch.Tensor:
        """Apply SE to the gathered map; the squeeze averages over the whole gated map, zeros included."""
        se = getattr(self, self.layout.squeeze_excite)
        if not isinstance(se, SqueezeExcite):
            return hidden
        reduce_w, expand_w, expand_b = weights["se_reduce_w"], weights["se_expand_w"], weights["se_expand_b"]
        if channel_index is not None:
            reduce_w = reduce_w.index_select(1, channel_index)
            expand_w, expand_b = expand_w.index_select(0, channel_index), expand_b.index_select(0, channel_index)
        # Dropped columns are zero in the masked map, so the mean is the kept sum over the full area.
        area = hidden.shape[2] * self.inner_width
        squeezed = hidden.sum(dim=(2, 3)) / area
        scale = se.gate(F.linear(se.act1(F.linear(squeezed, reduce_w, weights["se_reduce_b"])), expand_w, expand_b))
        if self.runtime.mac_counter is not None:
            self.runtime.mac_counter[0] += 2 * hidden.shape[0] * reduce_w.numel()
        return hidden * scale[:, :, None, None]

    def _consume_gathered(self, hidden: torch.Tensor, weights: dict[str, torch.Tensor],
                          channel_index: torch.Tensor | None, column_index: torch.Tensor | None) -> torch.Tensor:
        """Run the 1x1 project convolution; dropped columns of its output get the bias alone."""
        weight = weights["consumer_w"]
        if channel_index is not None:
            weight = weight.index_select(1, channel_index)
        kept = self._conv(hidden, weight, weights["consumer_b"], 1, 0)
        if column_index is None:
            return kept
        batch, channels, height, _ = kept.shape
        out = weights["consumer_b"][None, :, None, None].expand(batch, channels, height, self.inner_width).clone()
        return out.index_copy_(3, column_index, kept)


register_block_layout(InvertedResidual, INVERTED_RESIDUAL_LAYOUT, gated_class=GatedInvertedResidual)

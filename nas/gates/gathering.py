"""The general eval path of gated blocks: gathering kept channels and kept columns.

:class:`GatheredEvalPath` runs a gated block's branch in eval mode for any mix of channel and
column gates, and for batches of any size. Residual blocks with channel gates only take the lean
``GatedResidualBlock._forward_channels`` instead; MobileNetV3 blocks and every block with a column
gate take this one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nas.gates.modules import selection_union, top_k_indices, top_k_mask

__all__ = ["GatheredEvalPath"]


class GatheredEvalPath:
    """Eval-mode branch of a gated block that gathers the kept channels and columns it computes.

    A mixin of :class:`nas.gates.blocks.GatedResidualBlock`. It reads the block's ``runtime``,
    ``layout``, ``_stage_modules``, ``kept_channels``, ``kept_columns``, ``inner_channels``,
    ``inner_width`` and ``out_channels``. Block types with more between the gated map and the
    consumer (a depthwise stage) override :meth:`_produce_gathered`, :meth:`_after_gated_map`
    and :meth:`_consume_gathered`.
    """

    runtime: Any
    layout: Any
    kept_channels: int
    kept_columns: int
    inner_channels: int
    inner_width: int
    out_channels: int

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
              padding: Any, groups: int = 1) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, 1, groups)
        if self.runtime.mac_counter is not None:
            self.runtime.mac_counter[0] += out.numel() * weight[0].numel()
        return out

    @staticmethod
    def _select(logits: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return the batch's union of kept indices (u,), each image's 0/1 mask on the union (N, u) and on all (N, C).

        At batch 1 both masks are None, because the image keeps its whole union.
        """
        indices = top_k_indices(logits, kept)
        if logits.shape[0] == 1:
            return indices[0], None, None
        selected, union = selection_union(logits, indices)
        return union, selected.index_select(1, union), selected

    def _run_eval(self, inner: torch.Tensor, channel_logits: torch.Tensor | None,
                  column_logits: torch.Tensor | None, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the gated branch in eval mode, skipping dropped work where that pays.

        Each image keeps its own channels and columns, so "skip" gives the outputs of "mask" for
        any batch size. At batch 1 the block computes only what the image keeps. At larger batches
        it gathers the union of the batch's selected channels and zeroes, per image, what that
        image dropped. At batch 32, 32 selections of 60% of the channels cover nearly all of them:
        when the union leaves more than ``skip_max_share`` of the inner-convolution MACs, gathering
        saves little and costs index copies, so the block runs dense and masks. The gates then add
        only their pooled layers, one top-k and one multiply. A per-image loop would keep every
        image's savings, but it replaces one batched convolution by N small ones, and the per-call
        overhead and lost batching cost more than the skipped MACs at these sizes.

        Columns are gathered at batch 1 only and masked otherwise, because a batch's union of
        columns is nearly full. Residual blocks with channel gates only take
        :meth:`nas.gates.blocks.GatedResidualBlock._forward_channels`, the same computation with less overhead.
        """
        skip = self.runtime.mode == "skip"
        single = isinstance(inner.shape[0], int) and inner.shape[0] == 1
        # A traced program (torch.export with a dynamic batch) cannot size tensors by a batch's
        # union, so traced batches other than 1 take the dense masked path.
        gather_channels = skip and (single or not torch.compiler.is_compiling())
        channel_index, channel_mask, column_index, column_mask = None, None, None, None
        channel_full, column_full = None, None
        if channel_logits is not None and gather_channels:
            channel_index, channel_mask, channel_full = self._select(channel_logits, self.kept_channels)
        elif channel_logits is not None:
            channel_mask = top_k_mask(channel_logits, self.kept_channels)
        if column_logits is not None and skip and single:
            column_index, column_mask, column_full = self._select(column_logits, self.kept_columns)
        elif column_logits is not None:
            column_mask = top_k_mask(column_logits, self.kept_columns)

        share = 1.0
        if channel_index is not None:
            share *= channel_index.numel() / self.inner_channels
        if column_index is not None:
            share *= column_index.numel() / self.inner_width
        if not single and share > self.runtime.skip_max_share:
            # Dense: compute every channel and column, then mask with each image's own selection.
            if channel_index is not None:
                channel_mask = channel_full
            if column_index is not None:
                column_mask = column_full
            channel_index, column_index = None, None

        hidden = self._produce_gathered(inner, weights, channel_index, column_index)
        mask = self._outer_mask(channel_mask, column_mask)
        if mask is not None:
            hidden.mul_(mask)
        hidden = self._after_gated_map(hidden, weights, channel_index)
        return self._consume_gathered(hidden, weights, channel_index, column_index)

    def _after_gated_map(self, hidden: torch.Tensor, weights: dict[str, torch.Tensor],
                         channel_index: torch.Tensor | None) -> torch.Tensor:
        """Run what lies between the gated map and the consumer (nothing in a residual block)."""
        return hidden

    @staticmethod
    def _outer_mask(channel_mask: torch.Tensor | None, column_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Return the (N, channels or 1, 1, columns or 1) product of the two masks, or None when both are None."""
        if channel_mask is None:
            return column_mask[:, None, None, :] if column_mask is not None else None
        if column_mask is None:
            return channel_mask[:, :, None, None]
        return channel_mask[:, :, None, None] * column_mask[:, None, None, :]

    def _produce_gathered(self, inner: torch.Tensor, weights: dict[str, torch.Tensor],
                          channel_index: torch.Tensor | None, column_index: torch.Tensor | None) -> torch.Tensor:
        """Compute the producer's kept channels at its kept columns: (N, u_channels, H_out, u_columns).

        Without indices it computes the whole map, the dense path.
        """
        conv, _, act = self._stage_modules(self.layout.producer)
        weight, bias = weights["producer_w"], weights["producer_b"]
        if channel_index is not None:
            weight = weight.index_select(0, channel_index)
            bias = bias.index_select(0, channel_index)
        if column_index is None:
            return act(self._conv(inner, weight, bias, conv.stride, conv.padding))

        # Lay the kernel-wide input window of every kept output column side by side, then slide the
        # kernel with a column stride of its own width: each window yields exactly one output column.
        taps, pad = conv.kernel_size[1], conv.padding[1]
        offsets = torch.arange(taps, device=inner.device)
        positions = (column_index[:, None] * conv.stride[1] + offsets).reshape(-1)
        windows = F.pad(inner, (pad, pad)).index_select(3, positions)
        return act(self._conv(windows, weight, bias, (conv.stride[0], taps), (conv.padding[0], 0)))

    def _consume_gathered(self, hidden: torch.Tensor, weights: dict[str, torch.Tensor],
                          channel_index: torch.Tensor | None, column_index: torch.Tensor | None) -> torch.Tensor:
        """Run the consumer on a gathered map and return its full (N, C_out, H, W_inner) output.

        Without indices it runs the dense consumer.
        """
        conv = self._stage_modules(len(self.layout.stages) - 1)[0]
        if column_index is None:
            weight = weights["consumer_w"]
            if channel_index is not None:
                weight = weight.index_select(1, channel_index)
            return self._conv(hidden, weight, weights["consumer_b"], 1, conv.padding)

        # Each kept input column i meets kernel column dx in output column i + pad - dx. The
        # stacked (k, 1) filters give all of one column's contributions in one convolution. The
        # contributions are then added into a zero map padded by ``pad`` columns on each side.
        taps, pad = conv.kernel_size[1], conv.padding[1]
        weight = weights["consumer_columns_w"]
        if channel_index is not None:
            weight = weight.index_select(1, channel_index)
        partial = self._conv(hidden, weight, None, 1, (conv.padding[0], 0))
        batch, _, height, kept = partial.shape
        partial = partial.view(batch, taps, self.out_channels, height, kept).permute(0, 2, 3, 1, 4)
        partial = partial.reshape(batch, self.out_channels, height, taps * kept)
        offsets = torch.arange(taps, device=hidden.device)
        positions = (column_index[None, :] - offsets[:, None] + 2 * pad).reshape(-1)
        out = partial.new_zeros(batch, self.out_channels, height, self.inner_width + 2 * pad)
        out.index_add_(3, positions, partial)
        return out[..., pad : pad + self.inner_width] + weights["consumer_b"][:, None, None]

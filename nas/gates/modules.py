"""Channel and column gates, top-k selection and targeted dropout.

A gate reads the block's input, never the feature map it gates, so the block can decide what to
compute before computing it. The channel gate reads the global mean of the input, of shape
(N, C), and the column gate its mean over rows, of shape (N, C, W). Scores lie in (0, 1) and only rank features: the map is multiplied by
a 0/1 mask, and training passes the gradient to the scores with a straight-through estimator
(:func:`straight_through`). Selection ranks the logits, which order features like the scores
without the ties that float32 sigmoid saturation would create. So a gated block at keep ratio 1.0 computes exactly what the ungated
block computes, whatever the gates learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelGate",
    "ColumnGate",
    "keep_count",
    "row_mean",
    "selection_union",
    "straight_through",
    "targeted_dropout_mask",
    "top_k_indices",
    "top_k_mask",
]


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """Return the mean over rows of an (N, C, H, W) map, of shape (N, C, W): the column gate's input."""
    return x.mean(dim=2)


def straight_through(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` in the forward pass with the gradient of ``scores`` in the backward pass.

    The gradient a score receives is the first-order change of the loss when its feature is
    switched from dropped to kept (or back), which is what ranking the features needs.
    """
    # The difference is exactly zero in the forward pass, so the value is exactly the 0/1 mask.
    return mask + (scores - scores.detach())


class ChannelGate(nn.Module):
    """Scores a block's inner channels from the global mean of the block input.

    Args:
        in_channels: channels C of the block input.
        channels: inner channels that the gate scores.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, channels)

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Map the (N, C) mean of the block input to (N, channels) logits, which rank like the scores."""
        return self.fc(pooled)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Map the (N, C) mean of the block input to (N, channels) scores in (0, 1)."""
        return torch.sigmoid(self.logits(pooled))

    @property
    def macs(self) -> int:
        """Multiply-accumulates per image (the linear layer; pooling adds are not counted as MACs)."""
        return self.fc.in_features * self.fc.out_features


class ColumnGate(nn.Module):
    """Scores the columns of a block's inner map from the row mean of the block input.

    The row mean is average-pooled over ``stride`` columns, so it has one entry per inner column,
    then a 1-D convolution over columns reduces the channels to one score per column.

    Args:
        in_channels: channels C of the block input.
        stride: stride of the convolution that makes the inner map.
        kernel_size: width of the 1-D convolution over columns (odd).
    """

    def __init__(self, in_channels: int, stride: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ColumnGate kernel_size must be odd, but got {kernel_size}.")
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, 1, kernel_size, padding=kernel_size // 2)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Map the (N, C, W) row mean to (N, ceil(W / stride)) logits, which rank like the scores."""
        if self.stride > 1:
            rows = F.avg_pool1d(rows, self.stride, self.stride, ceil_mode=True)
        return self.conv(rows).squeeze(1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Map the (N, C, W) row mean to (N, ceil(W / stride)) scores in (0, 1)."""
        return torch.sigmoid(self.logits(rows))

    def macs(self, columns: int) -> int:
        """Multiply-accumulates per image for ``columns`` inner columns (pooling adds not counted)."""
        return self.conv.in_channels * self.conv.kernel_size[0] * columns


def keep_count(ratio: float, total: int) -> int:
    """Return how many of ``total`` features a keep ratio keeps: ``ceil(ratio * total)``, at least 1."""
    return max(1, min(total, math.ceil(ratio * total - 1e-9)))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Return the (N, k) indices of the ``k`` highest scores of each row of (N, n) ``scores``, unordered.

    Ties are broken by ``torch.topk``; callers that compare two paths must share one call's indices.
    """
    return torch.topk(scores, k, dim=1, sorted=False).indices


def selection_union(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (N, n) 0/1 mask of each row's ``indices`` (of ``scores``' shape and dtype) and the
    ascending (u,) indices selected by any row."""
    selected = torch.zeros_like(scores).scatter_(1, indices, 1.0)
    return selected, selected.amax(dim=0).nonzero().squeeze(1)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Return an (N, n) mask of ``scores``' dtype with 1 at each row's ``k`` highest scores, else 0."""
    mask = torch.zeros_like(scores)
    return mask.scatter_(1, top_k_indices(scores, k), 1.0)


def targeted_dropout_mask(
    scores: torch.Tensor, fraction: float, rate: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Return an (N, n) 0/1 mask that drops low-scoring features at random.

    The ``floor(fraction * n)`` lowest-scoring features of each row are candidates, and each candidate
    is dropped with probability ``rate``, independently per image. No rescaling follows, because
    inference drops the same features without rescaling.
    """
    n = scores.shape[1]
    candidates = int(math.floor(fraction * n + 1e-9))
    keep = torch.ones_like(scores)
    if candidates == 0 or rate == 0:
        return keep
    lowest = torch.topk(scores.detach(), candidates, dim=1, largest=False, sorted=False).indices
    noise = torch.rand(lowest.shape, generator=generator, device=scores.device, dtype=scores.dtype)
    dropped = (noise < rate).to(scores.dtype)
    return keep.scatter_(1, lowest, 1.0 - dropped)

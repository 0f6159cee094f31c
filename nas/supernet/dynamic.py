"""Sliceable layers: each holds the widest weights and runs on the leading channels it is given."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DynamicConv2d", "DynamicBatchNorm2d", "DynamicLinear", "recalibrate_batchnorm"]


class DynamicConv2d(nn.Conv2d):
    """A convolution whose active output channels are set by ``active_out``; input channels follow the input."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.active_out = self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_channels = x.shape[1]
        if self.groups == 1:
            weight = self.weight[: self.active_out, :in_channels]
            groups = 1
        else:
            # Depthwise: one filter per input channel.
            weight = self.weight[:in_channels]
            groups = in_channels
        bias = self.bias[: weight.shape[0]] if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the leading channels of its input, sharing the widest statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels == self.num_features:
            return super().forward(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        return F.batch_norm(
            x,
            self.running_mean[:channels] if self.running_mean is not None else None,
            self.running_var[:channels] if self.running_var is not None else None,
            self.weight[:channels],
            self.bias[:channels],
            use_batch_stats,
            factor,
            self.eps,
        )


class DynamicLinear(nn.Linear):
    """A linear layer whose input features follow the input; output features are fixed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, max_batches: int) -> None:
    """Recompute every BatchNorm's running statistics as a plain average over ``max_batches`` batches.

    Weight-sharing supernets train many subnets with one set of statistics, so a subnet's
    statistics must be re-estimated before its accuracy means anything. ``batches`` yields
    input tensors (or (input, target) pairs) already on the model's device.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)

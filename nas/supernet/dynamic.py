"""Sliceable layers: each holds the widest weights and runs on the leading channels it is given."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DynamicConv2d",
    "DynamicBatchNorm2d",
    "DynamicLinear",
    "DynamicDepthwiseConv2d",
    "DynamicSqueezeExcite",
    "permute_input_channels",
    "permute_output_channels",
    "recalibrate_batchnorm",
]


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
def permute_output_channels(layer: nn.Module, order: torch.Tensor) -> None:
    """Reorder the output channels of a convolution, linear layer or BatchNorm in place.

    New channel ``i`` is old channel ``order[i]``. Every per-channel tensor moves: the weight, the
    bias, and a BatchNorm's running mean and variance.

    Raises:
        ValueError: if ``order`` does not have one entry per output channel.
    """
    _check_order(layer, order, layer.weight.shape[0], "output")
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(layer, name, None)
        if tensor is not None:
            tensor.copy_(tensor[order])


@torch.no_grad()
def permute_input_channels(layer: nn.Conv2d | nn.Linear, order: torch.Tensor) -> None:
    """Reorder the input channels of a dense convolution or linear layer in place to follow a permuted input.

    Raises:
        ValueError: for a grouped convolution, or if ``order`` does not have one entry per input channel.
    """
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(
            f"permute_input_channels needs a dense convolution, but got groups={layer.groups}; "
            "permute a depthwise convolution's filters with permute_output_channels."
        )
    _check_order(layer, order, layer.weight.shape[1], "input")
    layer.weight.copy_(layer.weight[:, order])


def _check_order(layer: nn.Module, order: torch.Tensor, channels: int, side: str) -> None:
    if order.shape != (channels,):
        raise ValueError(
            f"The channel order for {type(layer).__name__} with {channels} {side} channels must have shape "
            f"({channels},), but got {tuple(order.shape)}."
        )


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


class DynamicDepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution with elastic kernel size, in Once-for-All's scheme.

    The layer stores one ``max_kernel x max_kernel`` filter per channel. A smaller kernel is the
    centre crop of the next larger one, passed through a learned ``k^2 x k^2`` linear map that starts
    as the identity: 7 -> 5 uses ``transform_7to5``, then 5 -> 3 uses ``transform_5to3``. Channels
    follow the input (the leading ``x.shape[1]`` filters); ``active_kernel`` sets the kernel size.

    Args:
        channels: channels of the widest input.
        kernel_sizes: the allowed odd kernel sizes.
        stride: convolution stride; padding is ``kernel // 2`` for every kernel size.
    """

    def __init__(self, channels: int, kernel_sizes: list[int], stride: int = 1) -> None:
        sizes = sorted(set(kernel_sizes))
        if any(k % 2 == 0 or k < 1 for k in sizes):
            raise ValueError(f"kernel_sizes must be odd and positive, but got {kernel_sizes}.")
        super().__init__(channels, channels, sizes[-1], stride, padding=sizes[-1] // 2, groups=channels, bias=False)
        self.kernel_sizes = sizes
        for larger, smaller in zip(sizes[1:], sizes[:-1]):
            self.register_parameter(self.transform_name(larger, smaller), nn.Parameter(torch.eye(smaller**2)))
        self.active_kernel = sizes[-1]

    @staticmethod
    def transform_name(larger: int, smaller: int) -> str:
        return f"transform_{larger}to{smaller}"

    def transform_kernel(self, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """Turn ``weight`` of shape (C, 1, max, max) into the (C, 1, k, k) filters of kernel size ``k``."""
        if kernel_size not in self.kernel_sizes:
            raise ValueError(f"kernel_size={kernel_size} is not allowed; allowed values are {self.kernel_sizes}.")
        for larger, smaller in zip(reversed(self.kernel_sizes[1:]), reversed(self.kernel_sizes[:-1])):
            if larger <= kernel_size:
                break
            start = (larger - smaller) // 2
            crop = weight[:, :, start : start + smaller, start : start + smaller]
            matrix = getattr(self, self.transform_name(larger, smaller))
            flat = F.linear(crop.reshape(-1, smaller**2), matrix)
            weight = flat.reshape(crop.shape)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight = self.transform_kernel(self.weight[:channels], self.active_kernel)
        return F.conv2d(x, weight, None, self.stride, self.active_kernel // 2, self.dilation, channels)


class DynamicSqueezeExcite(nn.Module):
    """Squeeze-and-excitation over the leading channels of its input, with ``active_reduced`` hidden channels.

    Pooling, 1x1 reduce convolution (with bias), ReLU, 1x1 expand convolution (with bias), hard
    sigmoid, then the input is scaled channel by channel. Parameter names match timm's
    ``SqueezeExcite`` (``conv_reduce``, ``conv_expand``).
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()
        self.active_reduced = reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, reduced = x.shape[1], self.active_reduced
        scale = x.mean((2, 3), keepdim=True)
        scale = F.conv2d(scale, self.conv_reduce.weight[:reduced, :channels], self.conv_reduce.bias[:reduced])
        scale = self.act1(scale)
        scale = F.conv2d(scale, self.conv_expand.weight[:channels, :reduced], self.conv_expand.bias[:channels])
        return x * self.gate(scale)

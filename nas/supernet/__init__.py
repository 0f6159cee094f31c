"""Weight-sharing supernets and their static subnets."""

from nas.supernet.base import Supernet, copy_sliced_state
from nas.supernet.dynamic import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear, recalibrate_batchnorm
from nas.supernet.dynamic import DynamicDepthwiseConv2d, DynamicSqueezeExcite

__all__ = [
    "DynamicBatchNorm2d",
    "DynamicConv2d",
    "DynamicDepthwiseConv2d",
    "DynamicLinear",
    "DynamicSqueezeExcite",
    "Supernet",
    "copy_sliced_state",
    "recalibrate_batchnorm",
]

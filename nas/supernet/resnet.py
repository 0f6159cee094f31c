"""Elastic ResNet supernet and the static subnet it exports.

Module names follow timm's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``, ``fc``),
so an exported subnet's state dict reads like timm's and extraction is a name-by-name slice.
"""

from __future__ import annotations

import torch
from torch import nn

from nas.spaces.resnet import ResNetArch, ResNetSpace, bottleneck_mid_channels
from nas.supernet.base import Supernet
from nas.supernet.dynamic import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear

__all__ = ["ElasticResNet", "ResNetSubnet", "BasicBlock", "Bottleneck"]


def _conv_bn(conv_cls, bn_cls, cin: int, cout: int, k: int, stride: int) -> tuple[nn.Module, nn.Module]:
    return conv_cls(cin, cout, k, stride, padding=k // 2, bias=False), bn_cls(cout)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; stride sits in the first."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, conv=nn.Conv2d, bn=nn.BatchNorm2d,
                 with_downsample: bool | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(conv, bn, cin, mid, 3, stride)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(conv, bn, mid, cout, 3, 1)
        self.act2 = nn.ReLU(inplace=True)
        if with_downsample is None:
            with_downsample = stride != 1 or cin != cout
        self.downsample = nn.Sequential(*_conv_bn(conv, bn, cin, cout, 1, stride)) if with_downsample else None
        self.stride = stride

    def set_active(self, mid: int, cout: int) -> None:
        self.conv1.active_out = mid
        self.conv2.active_out = cout
        if self.downsample is not None:
            self.downsample[0].active_out = cout
        self.active_out = cout

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None and (self.stride != 1 or x.shape[1] != self._out_channels()):
            shortcut = self.downsample(x)

        out = self.residual(x)
        return self._final_activation()(out + shortcut)

    def _final_activation(self) -> nn.Module:
        return self.act2

    def _out_channels(self) -> int:
        return getattr(self, "active_out", self.conv2.out_channels)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand, with a residual connection."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, conv=nn.Conv2d, bn=nn.BatchNorm2d,
                 with_downsample: bool | None = None) -> None:
        nn.Module.__init__(self)
        self.conv1, self.bn1 = _conv_bn(conv, bn, cin, mid, 1, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(conv, bn, mid, mid, 3, stride)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = _conv_bn(conv, bn, mid, cout, 1, 1)
        self.act3 = nn.ReLU(inplace=True)
        if with_downsample is None:
            with_downsample = stride != 1 or cin != cout
        self.downsample = nn.Sequential(*_conv_bn(conv, bn, cin, cout, 1, stride)) if with_downsample else None
        self.stride = stride

    def set_active(self, mid: int, cout: int) -> None:
        self.conv1.active_out = mid
        self.conv2.active_out = mid
        self.conv3.active_out = cout
        if self.downsample is not None:
            self.downsample[0].active_out = cout
        self.active_out = cout

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def _final_activation(self) -> nn.Module:
        return self.act3

    def _out_channels(self) -> int:
        return getattr(self, "active_out", self.conv3.out_channels)


def _block_class(space: ResNetSpace) -> type[BasicBlock]:
    return Bottleneck if space.cfg.block == "bottleneck" else BasicBlock


class _ResNetBody(nn.Module):
    """Stem, stages and head; shared by the supernet (dynamic layers) and the static subnet."""

    def _build_stem(self, space: ResNetSpace, conv, bn) -> None:
        stem = space.cfg.stem
        self.conv1, self.bn1 = _conv_bn(conv, bn, space.cfg.in_channels, stem.channels, stem.kernel_size, stem.stride)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem.max_pool else nn.Identity()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))


class ResNetSubnet(_ResNetBody):
    """A plain ResNet for one architecture of a :class:`ResNetSpace`."""

    def __init__(self, space: ResNetSpace, arch: ResNetArch) -> None:
        super().__init__()
        space.validate(arch)
        self.arch = arch
        self._build_stem(space, nn.Conv2d, nn.BatchNorm2d)
        block_cls = _block_class(space)
        stages: list[list[nn.Module]] = [[] for _ in range(space.num_stages)]
        for b in space.block_plan(arch):
            stages[b["stage"]].append(block_cls(b["in"], b["mid"], b["out"], b["stride"]))
        self.stage_names = []
        for i, blocks in enumerate(stages):
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(arch.widths[-1], space.cfg.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(self.global_pool(x), 1))


class ElasticResNet(_ResNetBody, Supernet):
    """The weight-sharing supernet of a :class:`ResNetSpace`: widest channels, deepest stages."""

    def __init__(self, space: ResNetSpace) -> None:
        Supernet.__init__(self, space)
        largest = space.largest()
        self._build_stem(space, DynamicConv2d, DynamicBatchNorm2d)
        block_cls = _block_class(space)
        channels = space.cfg.stem.channels
        self.stage_names = []
        for i, stage in enumerate(space.cfg.stages):
            width = max(stage.widths)
            mid = bottleneck_mid_channels(width, max(space.expand_options)) if space.cfg.block == "bottleneck" else width
            blocks = []
            for j in range(max(stage.depths)):
                stride = stage.stride if j == 0 else 1
                # Block 0 always holds a projection: a narrower subnet may need one where the widest does not.
                blocks.append(
                    block_cls(channels, mid, width, stride, DynamicConv2d, DynamicBatchNorm2d, with_downsample=j == 0)
                )
                channels = width
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = DynamicLinear(max(space.cfg.stages[-1].widths), space.cfg.num_classes)
        self._init_weights()
        self.set_active(largest)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_active(self, arch: ResNetArch) -> None:
        self.space.validate(arch)
        for b in self.space.block_plan(arch):
            block = getattr(self, self.stage_names[b["stage"]])[b["index"]]
            block.set_active(b["mid"], b["out"])
        self.active_arch = arch

    def build_static(self, arch: ResNetArch) -> ResNetSubnet:
        return ResNetSubnet(self.space, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for i, name in enumerate(self.stage_names):
            stage = getattr(self, name)
            for j in range(self.active_arch.depths[i]):
                x = stage[j](x)
        return self.fc(torch.flatten(self.global_pool(x), 1))

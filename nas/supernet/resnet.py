"""Elastic ResNet supernet and the static subnet it exports.

Module names follow timm's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``, ``fc``),
so an exported subnet's state dict reads like timm's and extraction is a name-by-name slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from nas.spaces.resnet import ResNetArch, ResNetSpace, bottleneck_mid_channels
from nas.supernet.base import Supernet
from nas.supernet.dynamic import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicLinear,
    permute_input_channels,
    permute_output_channels,
)

__all__ = ["ElasticResNet", "ResNetSubnet", "BasicBlock", "Bottleneck"]

_Value = TypeVar("_Value", int, float)


def _conv_bn(conv_cls, bn_cls, cin: int, cout: int, k: int, stride: int) -> tuple[nn.Module, nn.Module]:
    return conv_cls(cin, cout, k, stride, padding=k // 2, bias=False), bn_cls(cout)


def _downsample(conv_cls, bn_cls, cin: int, cout: int, stride: int, with_downsample: bool | None) -> nn.Module | None:
    """Return the 1x1 projection shortcut; by default only where the stride or the width changes."""
    if with_downsample is None:
        with_downsample = stride != 1 or cin != cout
    return nn.Sequential(*_conv_bn(conv_cls, bn_cls, cin, cout, 1, stride)) if with_downsample else None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; stride sits in the first."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, conv=nn.Conv2d, bn=nn.BatchNorm2d,
                 with_downsample: bool | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(conv, bn, cin, mid, 3, stride)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(conv, bn, mid, cout, 3, 1)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(conv, bn, cin, cout, stride, with_downsample)
        self.stride = stride
        # A supernet block (with_downsample given) skips its projection at the widths that do not need it.
        self.elastic_shortcut = with_downsample is not None

    def set_active(self, mid: int, cout: int) -> None:
        self.conv1.active_out = mid
        self.conv2.active_out = cout
        self._set_active_out(cout)

    def _set_active_out(self, cout: int) -> None:
        if self.downsample is not None:
            self.downsample[0].active_out = cout
        self.active_out = cout

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None and (not self.elastic_shortcut or self.stride != 1
                                            or x.shape[1] != self._out_channels()):
            shortcut = self.downsample(x)

        out = self.residual(x)
        return self._final_activation()(out + shortcut)

    def _final_activation(self) -> nn.Module:
        return self.act2

    def _out_channels(self) -> int:
        return getattr(self, "active_out", self.conv2.out_channels)

    def output_layers(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """Return the convolution and BatchNorm whose output the block adds to its shortcut."""
        return self.conv2, self.bn2

    def inner_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]]:
        """Return (producer, its BatchNorm, consumer) for each group of inner channels, in forward order."""
        return [(self.conv1, self.bn1, self.conv2)]


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
        self.downsample = _downsample(conv, bn, cin, cout, stride, with_downsample)
        self.stride = stride
        # A supernet block (with_downsample given) skips its projection at the widths that do not need it.
        self.elastic_shortcut = with_downsample is not None

    def set_active(self, mid: int, cout: int) -> None:
        self.conv1.active_out = mid
        self.conv2.active_out = mid
        self.conv3.active_out = cout
        self._set_active_out(cout)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def _final_activation(self) -> nn.Module:
        return self.act3

    def _out_channels(self) -> int:
        return getattr(self, "active_out", self.conv3.out_channels)

    def output_layers(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        return self.conv3, self.bn3

    def inner_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]]:
        return [(self.conv1, self.bn1, self.conv2), (self.conv2, self.bn2, self.conv3)]


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

    @torch.no_grad()
    def sort_expanded_channels(self, expand_stage: int = 0) -> None:
        """Put the most important channels first in every elastic width, before a sub-stage of the width phase.

        ``expand_stage`` counts the smaller values of each width decision (``width_i``, ``expand_i``)
        already trained, so the ``expand_stage + 1`` largest values of every decision count as
        trained. No channel moves across a width that a trained value selects. Trained subnets,
        the largest included, therefore keep their channels and compute the same function after the
        sort, because running statistics move with their channels.

        Importance of a block's inner channels (conv1's output, and in a bottleneck conv2's output
        too) is the L1 norm of the consuming convolution's weights per input channel. Importance of
        a stage's residual stream is ``|gamma|`` summed over the BatchNorms that write to it: every
        block's last BatchNorm and the projection's. One order per stage moves those layers and
        every reader of the stream: the stage's later blocks, the next stage's first block (conv1
        and projection), or the classifier. The stem's output is sorted the same way. A stride-1
        stage whose first block adds the previous stream through its identity shortcut, at a width
        trained on both sides, shares one order with that stream, so the shortcut and the residual
        stay aligned channel by channel. For stage 0 the previous stream is the stem's output.

        Raises:
            ValueError: if ``expand_stage`` is not in ``[0, n - 1]``, where ``n`` is the number of values
                of the width decision with the most values.
        """
        options = [len(stage.widths) for stage in self.space.cfg.stages] + [len(self.space.expand_options)]
        limit = max(options)
        if isinstance(expand_stage, bool) or not isinstance(expand_stage, int) or not 0 <= expand_stage < limit:
            raise ValueError(
                f"expand_stage must be an integer in [0, {limit - 1}] for space {self.space.name!r}, whose "
                f"width decision with the most values has {limit}, but got {expand_stage!r}."
            )
        trained = expand_stage + 1

        for group in _tied_groups(self._streams(trained)):
            _sort_streams(group)

        for i, name in enumerate(self.stage_names):
            tiers = self._trained_inner_widths(i, trained)
            for block in getattr(self, name):
                for producer, norm, consumer in block.inner_layers():
                    _sort_inner_channels(producer, norm, consumer, tiers)

    def _streams(self, trained: int) -> list[_Stream]:
        """Return the stem's output stream and each stage's residual stream, with their writers and readers."""
        streams = [_Stream(self.conv1.out_channels, [self.conv1.out_channels], producers=[self.conv1, self.bn1],
                           norms=[self.bn1])]
        for i, name in enumerate(self.stage_names):
            config = self.space.cfg.stages[i]
            blocks = list(getattr(self, name))
            stream = _Stream(max(config.widths), _largest(config.widths, trained),
                             shortcut_from_previous=config.stride == 1)
            for block in blocks:
                conv, norm = block.output_layers()
                stream.producers += [conv, norm]
                stream.norms.append(norm)
            stream.consumers += [block.conv1 for block in blocks[1:]]

            head = blocks[0]
            streams[-1].consumers.append(head.conv1)
            if head.downsample is not None:
                stream.producers += list(head.downsample)
                stream.norms.append(head.downsample[1])
                streams[-1].consumers.append(head.downsample[0])
            streams.append(stream)
        streams[-1].consumers.append(self.fc)
        return streams

    def _trained_inner_widths(self, stage: int, trained: int) -> list[int]:
        """Return the inner widths of a stage's blocks that the ``trained`` largest width and expand values select."""
        widths = _largest(self.space.cfg.stages[stage].widths, trained)
        if self.space.cfg.block != "bottleneck":
            return widths
        ratios = _largest(self.space.expand_options, trained)
        return sorted({bottleneck_mid_channels(width, ratio) for width in widths for ratio in ratios})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for i, name in enumerate(self.stage_names):
            stage = getattr(self, name)
            for j in range(self.active_arch.depths[i]):
                x = stage[j](x)
        return self.fc(torch.flatten(self.global_pool(x), 1))


@dataclass
class _Stream:
    """Channels that several layers share in one order: the stem's output or one stage's residual stream.

    ``channels`` is the supernet's width. ``trained`` contains the trained widths, the largest included.
    """

    channels: int
    trained: list[int]
    shortcut_from_previous: bool = False
    producers: list[nn.Module] = field(default_factory=list)
    norms: list[nn.BatchNorm2d] = field(default_factory=list)
    consumers: list[nn.Module] = field(default_factory=list)


def _largest(values: list[_Value], count: int) -> list[_Value]:
    return sorted(values)[-count:]


def _tied_groups(streams: list[_Stream]) -> list[list[_Stream]]:
    """Split consecutive streams into groups that must share one channel order.

    A stream joins the previous one when its first block can add the previous stream through the
    identity shortcut (stride 1, equal widths) at a width trained on both sides.

    NOTE: a group sorts every member with the union of their tiers, which constrains a member more
    than its own trained widths need. An identity shortcut at a width not yet trained on both
    sides may pair different channels after the sort, so that subnet changes like any untrained one.
    """
    groups = [[streams[0]]]
    for stream in streams[1:]:
        previous = groups[-1][-1]
        if stream.shortcut_from_previous and set(stream.trained) & set(previous.trained):
            groups[-1].append(stream)
        else:
            groups.append([stream])
    return groups


def _sort_streams(group: list[_Stream]) -> None:
    """Reorder a group of tied streams with one order, each stream taking its leading ``channels`` entries."""
    width = max(stream.channels for stream in group)
    importance = torch.zeros(width, device=group[0].norms[0].weight.device)
    for stream in group:
        for norm in stream.norms:
            importance[: stream.channels] += norm.weight.abs()
    # Every stream's own width is a tier boundary, so each prefix of ``order`` is a permutation of its stream.
    order = _tiered_order(importance, [trained for stream in group for trained in stream.trained])

    for stream in group:
        own = order[: stream.channels]
        for layer in stream.producers:
            permute_output_channels(layer, own)
        for layer in stream.consumers:
            permute_input_channels(layer, own)


def _sort_inner_channels(producer: nn.Conv2d, norm: nn.BatchNorm2d, consumer: nn.Conv2d, tiers: list[int]) -> None:
    order = _tiered_order(consumer.weight.abs().sum(dim=(0, 2, 3)), tiers)
    permute_output_channels(producer, order)
    permute_output_channels(norm, order)
    permute_input_channels(consumer, order)


def _tiered_order(importance: torch.Tensor, boundaries: list[int]) -> torch.Tensor:
    """Return the channel order that sorts by descending importance but moves no channel across a boundary.

    Ties keep their current order.
    """
    tier = torch.zeros(len(importance), dtype=torch.long, device=importance.device)
    for boundary in boundaries:
        tier[boundary:] += 1
    by_importance = torch.argsort(importance, descending=True, stable=True)
    return by_importance[torch.argsort(tier[by_importance], stable=True)]

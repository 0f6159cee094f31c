"""Importance sorting of the elastic ResNet's channels before the width phase of progressive shrinking."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from nas.spaces import create_space
from nas.spaces.resnet import ResNetArch
from nas.supernet.dynamic import permute_input_channels, permute_output_channels
from nas.supernet.resnet import ElasticResNet
from tests.conftest import load_space_config

# Small variants with 28x28 inputs. The stem has 16 channels, so "basic_stem_tied" uses the stem's
# output as stage 0's identity shortcut in its largest subnet. "bottleneck_stride1" has a second
# stride-1 stage whose first block takes an identity shortcut when both stages are 16 wide.
VARIANTS = {
    "basic": ("resnet", [{"depths": [1, 2], "widths": [8, 16, 24], "stride": 1},
                         {"depths": [1, 2], "widths": [16, 24, 32], "stride": 2}], None),
    "basic_stem_tied": ("resnet", [{"depths": [1, 2], "widths": [8, 16], "stride": 1},
                                   {"depths": [1, 2, 3], "widths": [8, 16, 24], "stride": 2}], None),
    "bottleneck": ("resnet_tiny_custom", None, None),
    "bottleneck_stride1": ("resnet_tiny_custom", [{"depths": [1, 2], "widths": [8, 16], "stride": 1},
                                                  {"depths": [1, 2], "widths": [16, 24], "stride": 1}],
                           [0.25, 0.5, 1.0]),
}


def make_space(variant: str):
    name, stages, ratios = VARIANTS[variant]
    config = load_space_config(name)
    if stages is not None:
        config["stages"] = stages
    if ratios is not None:
        config["expand_ratios"] = ratios
    return create_space(config)


def randomized_supernet(space, seed: int = 0) -> ElasticResNet:
    """Build the supernet with random BatchNorm affine parameters and running statistics, in eval mode."""
    torch.manual_seed(seed)
    supernet = space.build_supernet()
    with torch.no_grad():
        for module in supernet.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
        supernet.fc.bias.normal_()
    return supernet.eval()


def label_channels(norm: nn.BatchNorm2d) -> None:
    """Store each channel's index in ``running_mean`` so a test can see where the sort moved it."""
    with torch.no_grad():
        norm.running_mean.copy_(torch.arange(norm.num_features, dtype=torch.float32))


def labels(norm: nn.BatchNorm2d) -> list[int]:
    return [int(v) for v in norm.running_mean.tolist()]


def outputs(supernet: ElasticResNet, arch: ResNetArch, x: torch.Tensor) -> torch.Tensor:
    supernet.set_active(arch)
    with torch.no_grad():
        return supernet(x)


def trained_archs(space, count: int) -> list[ResNetArch]:
    """Return every largest-depth subnet that takes one of the ``count`` largest values of each width decision."""
    options = {}
    for name, values in space.choices().items():
        is_width = name.startswith(("width_", "expand_"))
        options[name] = values[-count:] if is_width else values[-1:]
    return [space.arch_from_choices(dict(zip(options, combo))) for combo in itertools.product(*options.values())]


def stage_output_norms(supernet: ElasticResNet, stage: int) -> list[nn.BatchNorm2d]:
    blocks = list(getattr(supernet, supernet.stage_names[stage]))
    return [block.output_layers()[1] for block in blocks] + [blocks[0].downsample[1]]


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("expand_stage", [0, 1, 2])
def test_largest_subnet_unchanged(variant, expand_stage, inputs):
    torch.set_num_threads(1)
    space = make_space(variant)
    supernet = randomized_supernet(space)
    before = outputs(supernet, space.largest(), inputs)

    supernet.sort_expanded_channels(expand_stage)

    after = outputs(supernet, space.largest(), inputs)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5), (before - after).abs().max()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trained_subnets_unchanged(variant, inputs):
    torch.set_num_threads(1)
    space = make_space(variant)
    supernet = randomized_supernet(space)
    archs = trained_archs(space, 2)
    before = [outputs(supernet, arch, inputs) for arch in archs]

    supernet.sort_expanded_channels(expand_stage=1)

    for arch, expected in zip(archs, before):
        after = outputs(supernet, arch, inputs)
        assert torch.allclose(expected, after, rtol=1e-4, atol=1e-5), (arch, (expected - after).abs().max())


def test_sort_changes_untrained_subnet(inputs):
    # Before sub-stage 0 only the largest widths count as trained, so the second largest ones take new channels.
    torch.set_num_threads(1)
    space = make_space("basic")
    supernet = randomized_supernet(space)
    arch = space.arch_from_choices({"resolution": 28, "depth_0": 2, "depth_1": 2, "width_0": 16, "width_1": 24})
    before = outputs(supernet, arch, inputs)

    supernet.sort_expanded_channels(expand_stage=0)

    assert not torch.allclose(before, outputs(supernet, arch, inputs), rtol=1e-4, atol=1e-5)


def test_stream_most_important_first():
    space = make_space("basic")
    supernet = randomized_supernet(space)
    norms = stage_output_norms(supernet, 1)
    importance = torch.tensor([float((7 * c) % 32) for c in range(32)])
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(importance / len(norms))
    label_channels(norms[0])

    supernet.sort_expanded_channels(expand_stage=0)

    assert labels(norms[0]) == torch.argsort(importance, descending=True, stable=True).tolist()
    assert torch.equal(norms[1].weight, norms[0].weight)


def test_stream_keeps_trained_tier():
    space = make_space("basic")
    supernet = randomized_supernet(space)
    norms = stage_output_norms(supernet, 1)
    importance = torch.arange(32, dtype=torch.float32)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(importance)
    label_channels(norms[0])

    supernet.sort_expanded_channels(expand_stage=1)

    order = labels(norms[0])
    assert order[:24] == list(range(23, -1, -1))
    assert order[24:] == list(range(31, 23, -1))


def test_stream_readers_follow():
    space = make_space("basic")
    supernet = randomized_supernet(space)
    fc_before = supernet.fc.weight.clone()
    norm = stage_output_norms(supernet, 1)[0]
    label_channels(norm)

    supernet.sort_expanded_channels(expand_stage=0)

    order = labels(norm)
    assert order != list(range(32))
    assert torch.equal(supernet.fc.weight, fc_before[:, order])


def test_inner_channels_most_important_first():
    space = make_space("bottleneck")
    supernet = randomized_supernet(space)
    block = supernet.layer2[0]
    channels = block.conv2.in_channels
    scale = torch.tensor([float((5 * c) % channels) + 1.0 for c in range(channels)])
    with torch.no_grad():
        block.conv2.weight.copy_(torch.ones_like(block.conv2.weight) * scale[None, :, None, None])
    label_channels(block.bn1)

    supernet.sort_expanded_channels(expand_stage=0)

    order = labels(block.bn1)
    assert order == torch.argsort(scale, descending=True, stable=True).tolist()
    importance = block.conv2.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(importance[:-1] >= importance[1:])


def test_inner_channels_keep_trained_tier():
    # Widths [32, 48, 64] and ratios [0.25, 0.5]: before sub-stage 1, stage 1's trained inner widths are 16, 24 and 32.
    space = make_space("bottleneck")
    supernet = randomized_supernet(space)
    block = supernet.layer2[0]
    importance = torch.arange(32, dtype=torch.float32)
    with torch.no_grad():
        block.conv3.weight.copy_(torch.ones_like(block.conv3.weight) * importance[None, :, None, None])
    label_channels(block.bn2)

    supernet.sort_expanded_channels(expand_stage=1)

    order = labels(block.bn2)
    assert order[:16] == list(range(15, -1, -1))
    assert order[16:24] == list(range(23, 15, -1))
    assert order[24:] == list(range(31, 23, -1))


def test_stem_follows_tied_stage():
    space = make_space("basic_stem_tied")
    supernet = randomized_supernet(space)
    norms = stage_output_norms(supernet, 0)
    label_channels(norms[0])
    label_channels(supernet.bn1)

    supernet.sort_expanded_channels(expand_stage=0)

    assert labels(supernet.bn1) == labels(norms[0])
    assert labels(supernet.bn1) != list(range(16))


@pytest.mark.parametrize("expand_stage", [-1, 3, 1.0, True])
def test_expand_stage_out_of_range_rejected(expand_stage):
    supernet = make_space("basic").build_supernet()
    with pytest.raises(ValueError, match=r"expand_stage must be an integer in \[0, 2\]"):
        supernet.sort_expanded_channels(expand_stage)


def test_permute_rejects_wrong_order_length():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"6 output channels must have shape \(6,\), but got \(4,\)"):
        permute_output_channels(conv, torch.arange(4))
    with pytest.raises(ValueError, match=r"4 input channels must have shape \(4,\), but got \(6,\)"):
        permute_input_channels(conv, torch.arange(6))


def test_permute_input_rejects_depthwise():
    conv = nn.Conv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="groups=4"):
        permute_input_channels(conv, torch.arange(4))

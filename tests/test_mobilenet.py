"""The MobileNetV3 space in Once-for-All's encoding, its supernet and OFA checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nas.spaces import LayerSpec, MobileNetV3Arch, SpaceError, create_space
from nas.spaces.mobilenet import make_divisible
from nas.supernet import DynamicDepthwiseConv2d, recalibrate_batchnorm
from nas.supernet.ofa_checkpoint import OFACheckpointError, convert_ofa_state_dict, load_ofa_checkpoint

CONF = Path(__file__).resolve().parents[1] / "conf" / "space"

# Two rows of a public latency dataset of OFA subnets, in OFA's encoding as published.
OFA_ARCH_R208 = '{"ks":[7,7,3,3,5,7,3,7,3,7,3,7,5,7,7,5,5,5,7,5],"e":[6,3,4,4,3,6,4,6,6,3,4,6,6,3,3,4,6,4,6,6],"d":[2,4,2,3,3],"r":208}'
OFA_ARCH_R176 = '{"ks":[7,5,5,5,3,5,3,5,3,5,3,5,7,5,5,3,3,7,3,5],"e":[6,3,6,3,3,3,6,6,6,6,3,6,4,4,4,6,6,6,4,4],"d":[4,4,4,4,2],"r":176}'


def load_space(name: str, **overrides):
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    if isinstance(config["in_channels"], str):
        config.update(in_channels=1, num_classes=10)
    config.update(overrides)
    return create_space(config)


@pytest.fixture(scope="module")
def imagenet():
    return load_space("mobilenet_imagenet")


@pytest.fixture(scope="module")
def imagenet_w12():
    return load_space("mobilenet_imagenet_w1.2")


@pytest.fixture(scope="module")
def mnist():
    # OFA's block structure at 28x28 pixels with narrow layers, so supernet tests run quickly on a CPU.
    return load_space("mobilenet", dropout_rate=0.0, base_widths=[8, 8, 8, 16, 16, 24, 32, 64, 64])


def calibrated(model: torch.nn.Module, shape: tuple[int, ...], seed: int = 0, batch: int = 8) -> torch.nn.Module:
    """Give BatchNorm statistics from random batches, so eval-mode outputs are of order one."""
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(batch, *shape, generator=generator) for _ in range(2)]
    recalibrate_batchnorm(model, batches, max_batches=2)
    return model.eval()


# -- encoding ---------------------------------------------------------------------------------
def test_make_divisible_known_values():
    assert make_divisible(16 * 1.2) == 24  # 19.2 rounds to 16, which loses more than 10%
    assert make_divisible(112 * 1.2) == 136
    assert make_divisible(144 // 4) == 40
    assert make_divisible(240 // 4) == 64
    assert make_divisible(4) == 8


def test_width_multiplier_widths(imagenet, imagenet_w12):
    assert imagenet.widths == (16, 16, 24, 40, 80, 112, 160, 960, 1280)
    assert imagenet_w12.widths == (24, 24, 32, 48, 96, 136, 192, 1152, 1536)


def test_ofa_dataset_rows_parse(imagenet):
    arch = imagenet.arch_from_json(OFA_ARCH_R208)
    assert arch.d == (2, 4, 2, 3, 3)
    assert arch.r == 208
    assert len(arch.ks) == 20
    assert json.loads(arch.to_json()) == json.loads(OFA_ARCH_R208)
    assert imagenet.arch_from_json(arch.to_json()) == arch


def test_ofa_tool_forms_accepted(imagenet):
    base = json.loads(OFA_ARCH_R176)
    with_list = {**base, "r": [176], "wid": None}
    with_image_size = {key: value for key, value in base.items() if key != "r"} | {"image_size": 176}
    assert imagenet.arch_from_dict(with_list) == imagenet.arch_from_dict(base)
    assert imagenet.arch_from_dict(with_image_size) == imagenet.arch_from_dict(base)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"wid": [1]}, "arch.wid must be null"),
        ({"r": [160, 176]}, "one resolution"),
        ({"image_size": 160}, "both 'r' and 'image_size'"),
        ({"d": [2, 4, 2, 3]}, "arch.d must have 5 entries"),
        ({"extra": 1}, "Unknown architecture keys ['extra']"),
        ({"ks": "7,5,3"}, "arch.ks must be a list"),
        ({"r": 176.5}, "arch.r must be an integer"),
    ],
)
def test_bad_encodings_rejected(imagenet, change, message):
    data = {**json.loads(OFA_ARCH_R176), **change}
    with pytest.raises(SpaceError) as err:
        imagenet.arch_from_dict(data)
    assert message in str(err.value)


def test_ignored_slots_still_validated(imagenet):
    data = json.loads(OFA_ARCH_R208)
    data["ks"][3] = 9  # stage 0 has depth 2, so slot 3 is ignored by the network
    with pytest.raises(SpaceError) as err:
        imagenet.arch_from_dict(data)
    assert "arch.ks[3]=9" in str(err.value)
    assert "[3, 5, 7]" in str(err.value)


def test_ignored_slots_do_not_change_layers(imagenet):
    arch = imagenet.arch_from_json(OFA_ARCH_R208)
    other = list(arch.ks)
    other[3] = 3 if other[3] != 3 else 5
    changed = MobileNetV3Arch(ks=tuple(other), e=arch.e, d=arch.d, r=arch.r)
    assert imagenet.layers(changed) == imagenet.layers(arch)
    assert imagenet.canonical(changed) == imagenet.canonical(arch)
    assert changed != arch


def test_canonical_resets_every_ignored_slot(imagenet):
    ks, e = imagenet.cfg.kernel_sizes, imagenet.cfg.expand_ratios
    arch = MobileNetV3Arch(ks=(max(ks),) * 20, e=(max(e),) * 20, d=(2, 3, 4, 2, 3), r=224)
    canonical = imagenet.canonical(arch)
    for stage, depth in enumerate(arch.d):
        for slot in range(stage * 4, stage * 4 + 4):
            used = slot < stage * 4 + depth
            assert canonical.ks[slot] == (max(ks) if used else min(ks)), slot
            assert canonical.e[slot] == (max(e) if used else min(e)), slot
    assert imagenet.layers(canonical) == imagenet.layers(arch)


def test_choices_cover_ofa_encoding(imagenet):
    choices = imagenet.choices()
    assert list(choices)[:6] == ["r", "d_0", "d_1", "d_2", "d_3", "d_4"]
    assert choices["ks_19"] == [3, 5, 7]
    assert choices["e_0"] == [3, 4, 6]
    assert choices["r"] == list(range(128, 225, 4))


def test_unknown_space_key_rejected():
    config = yaml.safe_load((CONF / "mobilenet_imagenet.yaml").read_text())
    with pytest.raises(SpaceError) as err:
        create_space({**config, "kernel_size": [3]})
    assert "kernel_size" in str(err.value)
    assert "kernel_sizes" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("base_widths", [16, 16, 24], "space.base_widths must be 9"),
        ("strides", [1, 2, 2, 3, 1, 2], "space.strides must be 6 strides"),
        ("width_mult", 0, "space.width_mult must be a positive"),
        ("kernel_sizes", [3, 4], "space.kernel_sizes values must be among"),
        ("depths", [], "space.depths must be a non-empty list"),
    ],
)
def test_bad_space_config_rejected(key, value, message):
    config = yaml.safe_load((CONF / "mobilenet_imagenet.yaml").read_text())
    with pytest.raises(SpaceError) as err:
        create_space({**config, key: value})
    assert message in str(err.value)


# -- layer shapes, parameters and MACs against OFA's own model ------------------------------------
# Figures from OFA's OFAMobileNetV3(ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
# after set_active_subnet(ks, e, d) and get_active_subnet(): parameters as PyTorch counts them, MACs
# as OFA's counter counts them (convolutions and linear layers, squeeze-and-excitation's 1x1
# convolutions included, its channel scaling not), summed in integers. LayerSpec also counts the
# scaling multiply, given here as its own column.
OFA_FIGURES = [
    # (width_mult, arch, parameters, OFA MACs, scaling multiplies)
    (1.0, "largest", 7_664_760, 566_170_656, 1_340_640),
    (1.0, "smallest", 3_410_792, 41_476_224, 99_072),
    (1.0, OFA_ARCH_R208, 5_136_960, 248_176_608, 787_328),
    (1.2, "largest", 10_701_632, 843_101_040, 1_629_936),
    (1.2, "smallest", 4_602_456, 65_536_896, 121_728),
    (1.2, OFA_ARCH_R208, 7_067_552, 375_577_440, 953_376),
]


def pick_arch(space, arch_name: str):
    if arch_name == "largest":
        return space.largest()
    if arch_name == "smallest":
        return space.smallest()
    return space.arch_from_json(arch_name)


@pytest.mark.parametrize(("width_mult", "arch_name", "params", "ofa_macs", "se_scaling"), OFA_FIGURES)
def test_params_and_macs_match_ofa(imagenet, imagenet_w12, width_mult, arch_name, params, ofa_macs, se_scaling):
    space = imagenet if width_mult == 1.0 else imagenet_w12
    arch = pick_arch(space, arch_name)
    layers = space.layers(arch)
    scaling = sum(layer.in_channels * layer.in_size**2 for layer in layers if layer.op == "se")
    assert space.params(arch) == params
    assert scaling == se_scaling
    assert space.macs(arch) == ofa_macs + se_scaling


@pytest.mark.parametrize("width_mult", [1.0, 1.2])
@pytest.mark.parametrize("arch_name", ["smallest", OFA_ARCH_R208])
def test_extracted_params_match_space(imagenet, imagenet_w12, width_mult, arch_name):
    space = imagenet if width_mult == 1.0 else imagenet_w12
    arch = pick_arch(space, arch_name)
    model = space.build_supernet().build_static(arch)
    assert sum(p.numel() for p in model.parameters()) == space.params(arch)


def test_largest_layer_shapes(imagenet):
    """Spot checks of OFA's largest w1.0 subnet at 224 pixels, worked out by hand from OFA's definition."""
    layers = imagenet.layers(imagenet.largest())
    assert len(layers) == 95
    assert layers[0].to_dict() == dict(op="conv", in_channels=3, out_channels=16, in_size=224, kernel_size=3,
                                       stride=2, groups=1, act="hswish")
    # First block: depthwise 3x3 with ReLU, projection, residual.
    assert [(l.op, l.groups, l.act) for l in layers[1:4]] == [("conv", 16, "relu"), ("conv", 1, "none"), ("add", 1, "none")]
    # Stage 1 (40 channels), block 0: 24 -> 144 -> 40 channels, 7x7 stride 2 at 56 pixels, SE to
    # make_divisible(36) = 40. It follows the stem (1 unit), the first block (3) and stage 0 (3 + 3 * 4).
    stage1 = layers[19:23]
    assert [(l.op, l.in_channels, l.out_channels, l.in_size, l.kernel_size, l.stride) for l in stage1] == [
        ("conv", 24, 144, 56, 1, 1),
        ("conv", 144, 144, 56, 7, 2),
        ("se", 144, 40, 28, 1, 1),
        ("conv", 144, 40, 28, 1, 1),
    ]
    assert layers[-4:] == [
        layers[-4].__class__("conv", 160, 960, 7, 1, 1, act="hswish"),
        layers[-4].__class__("gap", 960, 960, 7),
        layers[-4].__class__("linear", 960, 1280, 1, act="hswish", bias=False),
        layers[-4].__class__("linear", 1280, 1000, 1),
    ]
    residuals = [l for l in layers if l.op == "add"]
    assert len(residuals) == 1 + 5 * 3  # the first block and blocks 1..3 of every stage


def test_feature_mix_has_no_bias(imagenet):
    feature_mix = imagenet.layers(imagenet.largest())[-2]
    assert feature_mix.bias is False
    assert feature_mix.params == 960 * 1280
    assert json.loads(feature_mix.key())["bias"] is False
    assert LayerSpec.from_dict(feature_mix.to_dict()) == feature_mix


def test_layer_key_omits_default_bias():
    classifier = LayerSpec("linear", 1280, 1000, 1)
    assert "bias" not in classifier.to_dict()
    assert classifier.key() == (
        '{"act":"none","groups":1,"in_channels":1280,"in_size":1,"kernel_size":1,"op":"linear",'
        '"out_channels":1000,"stride":1}'
    )
    assert classifier.params == 1280 * 1000 + 1000


def test_layer_bias_only_for_linear():
    with pytest.raises(ValueError, match="bias=False applies only to op='linear'"):
        LayerSpec("conv", 8, 8, 4, bias=False)
    with pytest.raises(ValueError, match="bias must be true or false"):
        LayerSpec("linear", 8, 8, 1, bias="no")


def test_activations_and_se_per_stage(imagenet):
    plan = imagenet.block_plan(imagenet.largest())
    first_of_stage = [b for b in plan if b.index == 0]
    assert [b.act for b in first_of_stage] == ["relu", "relu", "hswish", "hswish", "hswish"]
    assert [b.se_channels > 0 for b in first_of_stage] == [False, True, False, True, True]
    assert [b.stride for b in first_of_stage] == [2, 2, 2, 1, 2]
    assert [b.in_size for b in first_of_stage] == [112, 56, 28, 14, 14]


# -- supernet -----------------------------------------------------------------------------------
def test_kernel_transform_chain():
    conv = DynamicDepthwiseConv2d(2, [3, 5, 7])
    torch.nn.init.normal_(conv.weight)
    with torch.no_grad():
        conv.transform_7to5.copy_(torch.randn(25, 25))
        conv.transform_5to3.copy_(torch.randn(9, 9))
    weight = conv.weight.detach()

    five = (weight[:, :, 1:6, 1:6].reshape(2, 25) @ conv.transform_7to5.detach().T).reshape(2, 1, 5, 5)
    three = (five[:, :, 1:4, 1:4].reshape(2, 9) @ conv.transform_5to3.detach().T).reshape(2, 1, 3, 3)
    with torch.no_grad():
        assert torch.allclose(conv.transform_kernel(weight, 5), five, atol=1e-5)
        assert torch.allclose(conv.transform_kernel(weight, 3), three, atol=1e-5)
        assert torch.equal(conv.transform_kernel(weight, 7), weight)


def test_identity_transform_is_centre_crop():
    conv = DynamicDepthwiseConv2d(4, [3, 5, 7], stride=2)
    conv.active_kernel = 3
    x = torch.randn(1, 3, 9, 9)
    expected = torch.nn.functional.conv2d(x, conv.weight[:3, :, 2:5, 2:5], None, 2, 1, groups=3)
    assert torch.allclose(conv(x), expected, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_extract_matches_supernet(mnist, seed):
    supernet = mnist.build_supernet()
    with torch.no_grad():
        for name, param in supernet.named_parameters():
            if "transform" in name:
                param.add_(0.1 * torch.randn_like(param))
    arch = mnist.sample(np.random.default_rng(seed))
    supernet.set_active(arch)
    calibrated(supernet, (1, 28, 28), seed, batch=4)
    model = supernet.extract(arch)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        reference = supernet(x)
        assert reference.abs().max() > 0.1
        assert torch.allclose(model(x), reference, atol=1e-5)


def test_extract_matches_supernet_in_training_mode(mnist):
    supernet = mnist.build_supernet().train()
    arch = mnist.sample(np.random.default_rng(5))
    supernet.set_active(arch)
    model = supernet.extract(arch)
    assert model.training
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(model(x), supernet(x), atol=1e-5)


def test_depth_uses_first_blocks(mnist):
    supernet = mnist.build_supernet()
    arch = mnist.arch_from_dict({**mnist.smallest().to_dict(), "d": [2, 2, 2, 2, 2]})
    supernet.set_active(arch)
    calibrated(supernet, (1, 28, 28), batch=4)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = supernet(x)
        for stage in range(1, 6):
            for block in supernet.blocks[stage][2:]:
                block.conv_pw.weight.add_(1.0)
        assert torch.equal(supernet(x), before)
        supernet.blocks[1][1].conv_pw.weight.add_(1.0)
        assert not torch.allclose(supernet(x), before)


def test_channel_sort_keeps_widest_output(mnist):
    supernet = mnist.build_supernet()
    with torch.no_grad():
        for name, param in supernet.named_parameters():
            if "bias" in name:
                param.normal_(0, 0.1)
    supernet.set_active(mnist.largest())
    calibrated(supernet, (1, 28, 28), batch=4)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = supernet(x)
        supernet.sort_expanded_channels()
        # Reordered channels change the summation order, so allow float32 rounding.
        assert torch.allclose(supernet(x), before, rtol=1e-4, atol=1e-4)

    block = supernet.blocks[2][1]  # has squeeze-and-excitation
    importance = block.conv_pwl.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(importance[:-1] >= importance[1:])
    hidden = block.se.conv_expand.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(hidden[:-1] >= hidden[1:])


def test_channel_sort_respects_trained_widths(mnist):
    supernet = mnist.build_supernet()
    block = supernet.blocks[1][1]
    in_channels = block.conv_pw.in_channels
    narrow, middle = in_channels * 3, in_channels * 4
    with torch.no_grad():
        block.conv_pwl.weight.normal_()
        original = block.conv_pw.weight.clone()
        supernet.sort_expanded_channels(expand_stage=2)
    rows = {tuple(row.flatten().tolist()): i for i, row in enumerate(original)}
    new_positions = [rows[tuple(row.flatten().tolist())] for row in block.conv_pw.weight]
    assert sorted(new_positions[:narrow]) == list(range(narrow))
    assert sorted(new_positions[narrow:middle]) == list(range(narrow, middle))

    with pytest.raises(ValueError) as err:
        supernet.sort_expanded_channels(expand_stage=3)
    assert "expand_stage must be in [0, 2]" in str(err.value)


@pytest.mark.parametrize("expand_stage", [1, 2])
def test_channel_sort_keeps_trained_subnets(mnist, expand_stage):
    supernet = mnist.build_supernet()
    with torch.no_grad():
        for name, tensor in supernet.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else 0.2 * torch.randn_like(tensor))
    supernet.eval()
    ratios = sorted(mnist.cfg.expand_ratios, reverse=True)
    # The subnets of the ratios trained before this sort; stages 1, 3 and 4 have squeeze-and-excitation.
    trained = [MobileNetV3Arch(ks=(3,) * 20, e=(ratio,) * 20, d=(4,) * 5, r=28) for ratio in ratios[: expand_stage + 1]]
    x = torch.randn(2, 1, 28, 28)
    before = []
    with torch.no_grad():
        for arch in trained:
            supernet.set_active(arch)
            before.append(supernet(x))
        supernet.sort_expanded_channels(expand_stage=expand_stage)
        for arch, reference in zip(trained, before):
            supernet.set_active(arch)
            torch.testing.assert_close(supernet(x), reference, rtol=1e-4, atol=1e-4)


def test_supernet_rejects_arch_outside_space(mnist):
    supernet = mnist.build_supernet()
    bad = MobileNetV3Arch(ks=(9,) * 20, e=(3,) * 20, d=(2,) * 5, r=28)
    with pytest.raises(SpaceError) as err:
        supernet.set_active(bad)
    assert "arch.ks[0]=9" in str(err.value)


def test_timm_mobilenetv3_matches_extracted(mnist):
    from nas.export import to_timm

    space = load_space("mobilenet", dropout_rate=0.0, base_widths=list(mnist.cfg.base_widths), stem_stride=2)
    arch = space.sample(np.random.default_rng(3))
    supernet = space.build_supernet()
    supernet.set_active(arch)
    model = calibrated(supernet.extract(arch), (1, 28, 28), batch=4)
    timm_model = to_timm(space, arch, model).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(timm_model(x), model(x), atol=1e-5)


@pytest.mark.parametrize("width_mult", [1.0, 1.2])
def test_timm_mobilenetv3_takes_ofa_weights(imagenet, imagenet_w12, width_mult):
    from nas.export import to_timm

    space = imagenet if width_mult == 1.0 else imagenet_w12
    arch = space.arch_from_json(OFA_ARCH_R208)
    model = space.build_supernet().build_static(arch)
    timm_model = to_timm(space, arch, model)  # loads the state dict with strict=True
    assert sum(p.numel() for p in timm_model.parameters()) == space.params(arch)


# -- OFA checkpoints ------------------------------------------------------------------------------
# SE widths of OFA's w1.0 blocks, by expanded width: make_divisible(mid // 4, 8), worked out by hand.
OFA_SE_WIDTH = {144: 40, 240: 64, 480: 120, 672: 168, 960: 240}


def ofa_layout_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with OFA's key layout and shapes for ofa_mbv3_d234_e346_k357_w1.0, with random values."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int) -> None:
        state[key] = torch.randn(*shape, generator=generator)

    def bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean"):
            put(f"{prefix}.{name}", channels)
        state[f"{prefix}.running_var"] = torch.rand(channels, generator=generator) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    put("first_conv.conv.weight", 16, 3, 3, 3)
    bn("first_conv.bn", 16)
    put("blocks.0.conv.depth_conv.conv.weight", 16, 1, 3, 3)
    bn("blocks.0.conv.depth_conv.bn", 16)
    put("blocks.0.conv.point_linear.conv.weight", 16, 16, 1, 1)
    bn("blocks.0.conv.point_linear.bn", 16)

    index, channels = 1, 16
    for width, has_se in ((24, False), (40, True), (80, False), (112, True), (160, True)):
        for _ in range(4):
            mid, prefix = channels * 6, f"blocks.{index}.conv"
            put(f"{prefix}.inverted_bottleneck.conv.conv.weight", mid, channels, 1, 1)
            bn(f"{prefix}.inverted_bottleneck.bn.bn", mid)
            put(f"{prefix}.depth_conv.conv.conv.weight", mid, 1, 7, 7)
            put(f"{prefix}.depth_conv.conv.7to5_matrix", 25, 25)
            put(f"{prefix}.depth_conv.conv.5to3_matrix", 9, 9)
            bn(f"{prefix}.depth_conv.bn.bn", mid)
            if has_se:
                reduced = OFA_SE_WIDTH[mid]
                put(f"{prefix}.depth_conv.se.fc.reduce.weight", reduced, mid, 1, 1)
                put(f"{prefix}.depth_conv.se.fc.reduce.bias", reduced)
                put(f"{prefix}.depth_conv.se.fc.expand.weight", mid, reduced, 1, 1)
                put(f"{prefix}.depth_conv.se.fc.expand.bias", mid)
            put(f"{prefix}.point_linear.conv.conv.weight", width, mid, 1, 1)
            bn(f"{prefix}.point_linear.bn.bn", width)
            index, channels = index + 1, width

    put("final_expand_layer.conv.weight", 960, 160, 1, 1)
    bn("final_expand_layer.bn", 960)
    put("feature_mix_layer.conv.weight", 1280, 960, 1, 1)
    put("classifier.linear.weight", 1000, 1280)
    put("classifier.linear.bias", 1000)
    return state


@pytest.fixture(scope="module")
def ofa_state():
    return ofa_layout_state()


def test_ofa_checkpoint_file_loads(imagenet, ofa_state, tmp_path):
    path = tmp_path / "ofa_mbv3_d234_e346_k357_w1.0"
    torch.save({"state_dict": ofa_state}, path)
    supernet = imagenet.build_supernet()
    load_ofa_checkpoint(supernet, path)
    ours = supernet.state_dict()

    assert torch.equal(ours["conv_stem.weight"], ofa_state["first_conv.conv.weight"])
    # OFA block 6 is stage 1 (40 channels), block 1.
    assert torch.equal(ours["blocks.2.1.conv_pw.weight"], ofa_state["blocks.6.conv.inverted_bottleneck.conv.conv.weight"])
    assert torch.equal(ours["blocks.2.1.conv_dw.transform_7to5"], ofa_state["blocks.6.conv.depth_conv.conv.7to5_matrix"])
    assert torch.equal(ours["blocks.2.1.se.conv_expand.bias"], ofa_state["blocks.6.conv.depth_conv.se.fc.expand.bias"])
    assert torch.equal(ours["blocks.5.3.bn3.running_var"], ofa_state["blocks.20.conv.point_linear.bn.bn.running_var"])
    assert torch.equal(ours["blocks.6.0.bn1.weight"], ofa_state["final_expand_layer.bn.weight"])
    assert torch.equal(ours["conv_head.weight"], ofa_state["feature_mix_layer.conv.weight"])
    assert torch.equal(ours["classifier.bias"], ofa_state["classifier.linear.bias"])
    assert len(ofa_state) == len(ours)


def test_ofa_older_key_spellings_load(imagenet, ofa_state):
    renamed = {}
    for key, value in ofa_state.items():
        key = key.replace(".conv.inverted_bottleneck.", ".mobile_inverted_conv.inverted_bottleneck.")
        key = key.replace(".bn.bn.", ".bn.").replace(".conv.conv.weight", ".conv.weight")
        renamed["module." + key.replace("classifier.linear.", "classifier.linear.linear.")] = value
    renamed = {k: v for k, v in renamed.items() if not k.endswith("num_batches_tracked")}
    supernet = imagenet.build_supernet()
    converted = convert_ofa_state_dict(renamed, supernet)
    assert torch.equal(converted["blocks.1.0.bn1.weight"], ofa_state["blocks.1.conv.inverted_bottleneck.bn.bn.weight"])
    assert torch.equal(converted["classifier.weight"], ofa_state["classifier.linear.weight"])


def test_ofa_unknown_and_missing_keys_listed(imagenet, ofa_state):
    state = dict(ofa_state)
    del state["blocks.3.conv.depth_conv.conv.5to3_matrix"]
    state["blocks.21.conv.depth_conv.conv.conv.weight"] = torch.zeros(1)
    with pytest.raises(OFACheckpointError) as err:
        convert_ofa_state_dict(state, imagenet.build_supernet())
    assert "1 unknown keys ['blocks.21.conv.depth_conv.conv.conv.weight']" in str(err.value)
    assert "1 missing keys ['blocks.3.conv.depth_conv.conv.5to3_matrix']" in str(err.value)


def test_ofa_wrong_width_checkpoint_rejected(imagenet_w12, ofa_state):
    with pytest.raises(OFACheckpointError) as err:
        convert_ofa_state_dict(ofa_state, imagenet_w12.build_supernet())
    assert "shape mismatches" in str(err.value)
    assert "first_conv.conv.weight: file (16, 3, 3, 3), supernet (24, 3, 3, 3)" in str(err.value)
    assert "mobilenet_imagenet_w1.2" in str(err.value)


def test_ofa_file_without_state_dict_rejected(imagenet, tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(OFACheckpointError) as err:
        load_ofa_checkpoint(imagenet.build_supernet(), tmp_path / "list.pth")
    assert "contains a list" in str(err.value)


def test_ofa_missing_file_named(imagenet, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_ofa_checkpoint(imagenet.build_supernet(), tmp_path / "absent.pth")
    assert "absent.pth" in str(err.value)


def test_ofa_reference_outputs_match(imagenet, tmp_path):
    """Outputs equal those of OFA's own network; runs only where OFA's package (``ofa``) is installed."""
    networks = pytest.importorskip("ofa.imagenet_classification.elastic_nn.networks")
    torch.manual_seed(0)
    ofa = networks.OFAMobileNetV3(n_classes=1000, dropout_rate=0, width_mult=1.0, ks_list=[3, 5, 7],
                                  expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    with torch.no_grad():
        for name, tensor in list(ofa.named_parameters()) + list(ofa.named_buffers()):
            if "matrix" in name or name.endswith(("bias", "running_mean")):
                tensor.add_(0.1 * torch.randn_like(tensor))
            elif name.endswith("running_var") or (".bn." in name and name.endswith("weight")):
                tensor.mul_(1 + 0.2 * torch.rand_like(tensor))
    torch.save({"state_dict": ofa.state_dict()}, tmp_path / "ofa.pth")
    supernet = imagenet.build_supernet().eval()
    load_ofa_checkpoint(supernet, tmp_path / "ofa.pth")
    x = torch.randn(2, 3, 128, 128)

    outputs = []
    for arch in (imagenet.arch_from_dict({**json.loads(OFA_ARCH_R208), "r": 128}), imagenet.smallest()):
        ofa.set_active_subnet(ks=list(arch.ks), e=list(arch.e), d=list(arch.d))
        supernet.set_active(arch)
        with torch.no_grad():
            reference = ofa.eval()(x)
            assert torch.allclose(supernet(x), reference, atol=1e-5)
            assert torch.allclose(supernet.extract(arch).eval()(x), reference, atol=1e-5)
        outputs.append(reference)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)

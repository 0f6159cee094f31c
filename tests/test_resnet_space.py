import json

import numpy as np
import pytest
import torch

from nas.spaces import ResNetArch, SpaceError, create_space
from nas.supernet.resnet import ResNetSubnet
from tests.conftest import load_space_config


def test_arch_json_round_trip(resnet_space):
    rng = np.random.default_rng(0)
    for _ in range(20):
        arch = resnet_space.sample(rng)
        again = resnet_space.arch_from_json(arch.to_json())
        assert again == arch
        assert json.loads(arch.to_json()) == arch.to_dict()


def test_sampling_is_seeded(resnet_space):
    first = [resnet_space.sample(np.random.default_rng(7)) for _ in range(3)]
    second = [resnet_space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert first == second


def test_arch_outside_space_names_field(resnet_space):
    arch = resnet_space.largest().to_dict()
    arch["widths"][1] = 20
    with pytest.raises(SpaceError, match=r"arch.widths\[1\]=20 is not allowed; allowed values are \[16, 24, 32, 48, 64\]"):
        resnet_space.arch_from_dict(arch)


def test_arch_unknown_key_rejected(resnet_space):
    arch = resnet_space.largest().to_dict()
    arch["kernel"] = 3
    with pytest.raises(SpaceError, match="Unknown architecture keys \\['kernel'\\]"):
        resnet_space.arch_from_dict(arch)


def test_arch_missing_key_rejected(resnet_space):
    arch = resnet_space.largest().to_dict()
    del arch["depths"]
    with pytest.raises(SpaceError, match="missing keys \\['depths'\\]"):
        resnet_space.arch_from_dict(arch)


def test_arch_wrong_stage_count(resnet_space):
    arch = resnet_space.largest().to_dict()
    arch["depths"] = [1, 1]
    with pytest.raises(SpaceError, match="arch.depths must have 3 entries"):
        resnet_space.arch_from_dict(arch)


def test_invalid_json_reports_text(resnet_space):
    with pytest.raises(SpaceError, match="not valid JSON"):
        resnet_space.arch_from_json("{depths: [1]")


def test_space_config_unknown_key(resnet_config):
    resnet_config["widht"] = 3
    with pytest.raises(SpaceError, match="Unknown keys \\['widht'\\] in space"):
        create_space(resnet_config)


def test_space_config_bad_block(resnet_config):
    resnet_config["block"] = "dense"
    with pytest.raises(SpaceError, match="space.block must be 'basic' or 'bottleneck', but got 'dense'"):
        create_space(resnet_config)


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.pop("stem"), r"Missing keys \['stem'\] in space; it needs \[.*'stem'"),
    (lambda c: c["stages"][0].pop("depths"), r"Missing keys \['depths'\] in space.stages\[0\]"),
    (lambda c: c.update(resolutions=["28"]), r"space.resolutions must contain whole numbers, but got \['28'\]"),
    (lambda c: c.update(block="bottleneck", expand_ratios=None), r"space.expand_ratios must be a non-empty list, but got None"),
    (lambda c: c["stem"].update(channels="abc"), r"space.stem.channels must be a whole number >= 1, but got 'abc'"),
    (lambda c: c["stem"].update(kernel_size=0), r"space.stem.kernel_size must be a whole number >= 1, but got 0"),
    (lambda c: c.update(tail_aware="no"), r"space.tail_aware must be true or false, but got 'no'"),
], ids=["missing-stem", "missing-depths", "string-resolution", "null-expand-ratios", "string-stem-channels",
        "zero-stem-kernel", "string-tail-aware"])
def test_space_config_errors(resnet_config, change, message):
    change(resnet_config)
    with pytest.raises(SpaceError, match=message):
        create_space(resnet_config)


def test_unknown_family_lists_registered(resnet_config):
    resnet_config["family"] = "vgg"
    with pytest.raises(SpaceError, match="Unknown space family 'vgg'; registered families are .*resnet"):
        create_space(resnet_config)


def test_layers_count_macs_and_params(resnet_space):
    arch = ResNetArch(depths=(1, 1, 1), widths=(16, 32, 64), expand_ratios=(), resolution=28)
    layers = resnet_space.layers(arch)
    # stem conv, 3 blocks (2 convs + add, plus a projection in stages 2 and 3), pool, classifier
    assert [layer.op for layer in layers].count("conv") == 1 + 2 + 3 + 3
    stem = layers[0]
    assert stem.macs == 1 * 16 * 9 * 28 * 28
    subnet = ResNetSubnet(resnet_space, arch)
    assert resnet_space.params(arch) == sum(p.numel() for p in subnet.parameters())


@pytest.mark.parametrize(
    "variant, arch, timm_name",
    [
        ("resnet_basic_imagenet", ResNetArch((2, 2, 2, 2), (64, 128, 256, 512), (), 224), "resnet18"),
        ("resnet_bottleneck_imagenet", ResNetArch((3, 4, 6, 3), (256, 512, 1024, 2048), (0.25,) * 4, 224), "resnet50"),
    ],
)
def test_imagenet_variant_equals_timm(variant, arch, timm_name):
    import timm

    space = create_space(load_space_config(variant))
    reference = timm.create_model(timm_name, pretrained=False)
    subnet = ResNetSubnet(space, arch)
    ours = {k: tuple(v.shape) for k, v in subnet.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    expected_params = sum(p.numel() for p in reference.parameters())
    assert space.params(arch) == expected_params
    assert sum(p.numel() for p in subnet.parameters()) == expected_params


def test_resnet18_forward_matches_timm_with_same_weights():
    import timm

    space = create_space(load_space_config("resnet_basic_imagenet"))
    arch = ResNetArch((2, 2, 2, 2), (64, 128, 256, 512), (), 160)
    reference = timm.create_model("resnet18", pretrained=False).eval()
    subnet = ResNetSubnet(space, arch).eval()
    subnet.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), reference(x), rtol=1e-4, atol=1e-4)


def test_tail_aware_widths_never_exceed_widest(resnet_space):
    new = resnet_space.with_width_choices({"width_0": [16, 32, 40]})
    assert new.choices()["width_0"] == [16, 32, 40]
    with pytest.raises(SpaceError, match="exceed the supernet's widest 40"):
        resnet_space.with_width_choices({"width_0": [48]})


def test_canonical_merges_ratios_of_one_inner_width():
    space = create_space(load_space_config("resnet_tiny_custom"))
    # At 16 channels, ratios 0.25 and 0.5 both give 8 inner channels; at 32 they give 8 and 16.
    a = ResNetArch(depths=(1, 1), widths=(16, 32), expand_ratios=(0.5, 0.5), resolution=28)
    canonical = space.canonical(a)
    assert canonical.expand_ratios == (0.25, 0.5)
    assert space.canonical(canonical) == canonical
    assert space.layers(canonical) == space.layers(a)
    wide = ResNetArch(depths=(1, 1), widths=(24, 32), expand_ratios=(0.5, 0.25), resolution=28)
    assert space.canonical(wide) == wide


def test_tail_aware_shares_plain_caches():
    from nas.supernet.cache import supernet_key

    config = load_space_config("resnet")
    plain, tail = create_space(config), create_space({**config, "tail_aware": True})
    assert tail.raw_config["tail_aware"] is True
    # The flag moves widths only after profiling and supernet training, so the caches are shared.
    assert tail.config_hash() == plain.config_hash()
    assert supernet_key(tail, {"name": "mnist"}, {"epochs": 1}, 0) == supernet_key(plain, {"name": "mnist"}, {"epochs": 1}, 0)
    # Plain spaces keep the hash they had before tail_aware was left out of it.
    import hashlib
    import json

    text = json.dumps(plain.raw_config, sort_keys=True, default=str)
    assert plain.config_hash() == hashlib.sha256(text.encode()).hexdigest()[:12]
    # Other widths are another space.
    moved = plain.with_width_choices({key: values[1:] for key, values in plain.width_choices().items()})
    assert moved.config_hash() != plain.config_hash()

"""Contract tests that every search space must pass: each YAML in conf/space and the example family.

ImageNet-sized variants (3 input channels) get the cheap checks in full, and their supernet runs
only its smallest subnet at the smallest resolution, in training mode, with one image.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from example_space import EXAMPLE_CONFIG

from nas.export import export_program
from nas.spaces import LayerSpec, SearchSpace, SpaceError, create_space, load_space_config
from nas.supernet import Supernet, recalibrate_batchnorm

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "conf" / "space").glob("*.yaml"))


def load_config(name: str) -> dict:
    """Load a space configuration; Hydra's ``${data.*}`` interpolations get MNIST's values."""
    if name == EXAMPLE_CONFIG["name"]:
        return dict(EXAMPLE_CONFIG)
    return load_space_config(ROOT / "conf" / "space" / f"{name}.yaml")


NAMES = [path.stem for path in YAMLS] + [EXAMPLE_CONFIG["name"]]
SMALL = [name for name in NAMES if load_config(name)["in_channels"] == 1]


@pytest.fixture(scope="module", params=NAMES)
def space(request) -> SearchSpace:
    return create_space(load_config(request.param))


@pytest.fixture(scope="module", params=SMALL)
def small_space(request) -> SearchSpace:
    return create_space(load_config(request.param))


_SUPERNETS: dict[str, Supernet] = {}


def supernet_of(space: SearchSpace) -> Supernet:
    if space.name not in _SUPERNETS:
        _SUPERNETS[space.name] = space.build_supernet()
    return _SUPERNETS[space.name]


def test_yaml_name_matches_file():
    for path in YAMLS:
        assert yaml.safe_load(path.read_text())["name"] == path.stem


def test_every_yaml_names_registered_family():
    from nas.spaces import list_families

    for path in YAMLS:
        assert yaml.safe_load(path.read_text())["family"] in list_families()


# -- decisions and architectures ---------------------------------------------------------------
def test_sampling_is_seeded(space):
    first = [space.sample(np.random.default_rng(seed)) for seed in range(4)]
    again = [space.sample(np.random.default_rng(seed)) for seed in range(4)]
    assert first == again
    assert len(set(first)) > 1


def test_sampled_archs_are_valid(space):
    rng = np.random.default_rng(0)
    for _ in range(5):
        space.validate(space.sample(rng))


def test_largest_and_smallest_use_extreme_choices(space):
    assert space.arch_from_choices({key: max(values) for key, values in space.choices().items()}) == space.largest()
    assert space.arch_from_choices({key: min(values) for key, values in space.choices().items()}) == space.smallest()


def test_invalid_choice_names_field_and_allowed(space):
    base = {key: values[0] for key, values in space.choices().items()}
    for key, values in space.choices().items():
        bad = max(values) + 1000
        with pytest.raises(SpaceError) as err:
            space.arch_from_choices({**base, key: bad})
        message = str(err.value)
        assert message.startswith("arch."), message
        assert re.search(rf"={re.escape(str(bad))}\b", message), message
        assert "allowed values are" in message
        assert all(str(value) in message for value in values), message


def test_unknown_arch_key_rejected(space):
    data = {**space.smallest().to_dict(), "bogus_key": 1}
    with pytest.raises(SpaceError) as err:
        space.arch_from_dict(data)
    assert "bogus_key" in str(err.value)


def test_missing_arch_key_rejected(space):
    data = space.smallest().to_dict()
    removed = sorted(data)[0]
    del data[removed]
    with pytest.raises(SpaceError) as err:
        space.arch_from_dict(data)
    assert removed in str(err.value)


def test_unknown_config_key_rejected(space):
    with pytest.raises(SpaceError) as err:
        create_space({**space.raw_config, "bogus_key": 1})
    assert "bogus_key" in str(err.value)


def test_json_round_trip(space):
    rng = np.random.default_rng(1)
    for arch in (space.largest(), space.smallest(), space.sample(rng)):
        assert space.arch_from_json(arch.to_json()) == arch
        assert space.arch_from_dict(arch.to_dict()) == arch


# -- layers, parameters and MACs ---------------------------------------------------------------
def test_layers_are_consistent(space):
    for arch in (space.largest(), space.smallest()):
        layers = space.layers(arch)
        assert all(isinstance(layer, LayerSpec) for layer in layers)
        assert layers[0].in_channels == space.input_shape(arch)[0]
        assert layers[0].in_size == space.input_shape(arch)[1]
        assert layers[-1].op == "linear"
        assert space.macs(arch) > 0


def test_largest_costs_most(space):
    assert space.macs(space.largest()) > space.macs(space.smallest())
    assert space.params(space.largest()) > space.params(space.smallest())


def test_decisions_have_progressive_dimensions(space):
    from nas.progressive import PHASES, build_plan, decision_dimensions

    dims = decision_dimensions(space)
    assert set(dims) == set(space.choices())
    assert set(dims.values()) <= {"resolution", *PHASES[1:]}
    plan = build_plan(space, {phase: 1 for phase in PHASES}, steps_per_epoch=4)
    assert plan.stages[-1].options == {name: sorted(values) for name, values in space.choices().items()}


def test_params_match_built_module(space):
    supernet = supernet_of(space)
    for arch in (space.largest(), space.smallest(), space.sample(np.random.default_rng(2))):
        model = supernet.build_static(arch)
        assert sum(p.numel() for p in model.parameters()) == space.params(arch)


# -- supernet and extraction ---------------------------------------------------------------------
def batchnorm_training(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in training mode except for dropout, so two forward passes are comparable."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    return model


def test_extract_matches_supernet_smallest(space):
    supernet = batchnorm_training(supernet_of(space))
    arch = space.smallest()
    supernet.set_active(arch)
    model = batchnorm_training(supernet.extract(arch))
    x = torch.randn(1, *space.input_shape(arch), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), supernet(x), atol=1e-5)


def test_extract_matches_supernet_eval(small_space):
    supernet = supernet_of(small_space)
    generator = torch.Generator().manual_seed(3)
    for seed in (0, 1):
        arch = small_space.sample(np.random.default_rng(seed))
        supernet.set_active(arch)
        shape = small_space.input_shape(arch)
        recalibrate_batchnorm(supernet, [torch.randn(4, *shape, generator=generator)], max_batches=1)
        supernet.eval()
        model = supernet.extract(arch)
        assert not model.training
        x = torch.randn(2, *shape, generator=generator)
        with torch.no_grad():
            assert torch.allclose(model(x), supernet(x), atol=1e-5)


def test_supernet_output_shape(small_space):
    supernet = supernet_of(small_space).eval()
    arch = small_space.largest()
    supernet.set_active(arch)
    with torch.no_grad():
        out = supernet(torch.zeros(2, *small_space.input_shape(arch)))
    assert out.shape == (2, small_space.raw_config["num_classes"])


def test_torch_export_of_subnet(small_space, tmp_path):
    arch = small_space.smallest()
    model = supernet_of(small_space).extract(arch).eval()
    x = torch.randn(2, *small_space.input_shape(arch))
    program = export_program(model, x, tmp_path / "subnet.pt2", dynamic_batch=False)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_docs_show_example_file():
    docs = (ROOT / "docs" / "spaces.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, flags=re.S)
    example = (ROOT / "tests" / "example_space.py").read_text()
    assert example in blocks


def test_resnet_resolution_follows_data():
    config = load_space_config(ROOT / "conf" / "space" / "resnet.yaml", {"in_channels": 3, "resolution": 32})
    assert config["resolutions"] == [32]
    assert config["in_channels"] == 3
    assert load_space_config(ROOT / "conf" / "space" / "resnet.yaml")["resolutions"] == [28]
    with pytest.raises(SpaceError, match="not found"):
        load_space_config(ROOT / "conf" / "space" / "no_such_space.yaml")

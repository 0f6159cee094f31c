"""Search-space families. Importing this package registers the built-in families."""

from nas.spaces.base import (
    Arch,
    SearchSpace,
    SpaceError,
    create_space,
    dataclass_from_mapping,
    list_families,
    load_space_config,
    register_space,
)
from nas.spaces.layers import LayerSpec
from nas.spaces.resnet import ResNetArch, ResNetSpace
from nas.spaces.mobilenet import MobileNetV3Arch, MobileNetV3Space

__all__ = [
    "Arch",
    "LayerSpec",
    "MobileNetV3Arch",
    "MobileNetV3Space",
    "ResNetArch",
    "ResNetSpace",
    "SearchSpace",
    "SpaceError",
    "create_space",
    "dataclass_from_mapping",
    "list_families",
    "load_space_config",
    "register_space",
]

"""Search-space families. Importing this package registers the built-in families."""

from nas.spaces.base import (
    Arch,
    SearchSpace,
    SpaceError,
    create_space,
    dataclass_from_mapping,
    list_families,
    register_space,
)
from nas.spaces.layers import LayerSpec
from nas.spaces.resnet import ResNetArch, ResNetSpace

__all__ = [
    "Arch",
    "LayerSpec",
    "ResNetArch",
    "ResNetSpace",
    "SearchSpace",
    "SpaceError",
    "create_space",
    "dataclass_from_mapping",
    "list_families",
    "register_space",
]

"""Search-space interface, architecture values and the space registry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from nas.spaces.layers import LayerSpec

__all__ = [
    "Arch",
    "SearchSpace",
    "SpaceError",
    "register_space",
    "create_space",
    "load_space_config",
    "list_families",
    "dataclass_from_mapping",
]

T = TypeVar("T")


class SpaceError(ValueError):
    """An architecture or space configuration that the space does not allow."""


def dataclass_from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys.

    ``where`` names the configuration node in error messages, for example ``"space.stem"``.
    """
    if not isinstance(data, Mapping):
        raise SpaceError(f"{where} must be a mapping, but got {type(data).__name__}: {data!r}.")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SpaceError(f"Unknown keys {unknown} in {where}; allowed keys are {names}.")
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    missing = [name for name in required if name not in data]
    if missing:
        raise SpaceError(f"Missing keys {missing} in {where}; it needs {required}.")
    return cls(**dict(data))


@dataclasses.dataclass(frozen=True)
class Arch:
    """Base of all architecture values: small, immutable, and a JSON round trip away from a dict.

    Subclasses are frozen dataclasses whose fields are ints, floats or tuples of them.
    """

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Arch:
        """Build an architecture from a mapping; unknown or missing keys raise :class:`SpaceError`."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SpaceError(f"Unknown architecture keys {unknown} for {cls.__name__}; allowed keys are {names}.")
        missing = [n for n in names if n not in data]
        if missing:
            raise SpaceError(f"Architecture for {cls.__name__} is missing keys {missing}.")
        values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data.items()}
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpaceError(f"Architecture is not valid JSON ({err}): {text[:200]!r}.") from err
        return cls.from_dict(data)


class SearchSpace(ABC):
    """A family of architectures with a weight-sharing supernet.

    Decision variables: :meth:`choices` names every independent decision and its allowed values,
    so samplers (Optuna, random) need no family-specific code; :meth:`arch_from_choices` turns one
    value per decision into an :class:`Arch`. Every architecture the space allows is a subnet of the
    supernet from :meth:`build_supernet`.
    """

    family: ClassVar[str]
    arch_type: ClassVar[type[Arch]]

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.raw_config = dict(config)

    @property
    def name(self) -> str:
        """Variant name, as in ``conf/space/<name>.yaml``."""
        return str(self.raw_config.get("name", self.family))

    # -- decisions and architectures -------------------------------------------------------
    @abstractmethod
    def choices(self) -> dict[str, list[Any]]:
        """Return each decision variable's allowed values, in a fixed order."""

    @abstractmethod
    def arch_from_choices(self, values: Mapping[str, Any]) -> Arch:
        """Build an architecture from one value per decision in :meth:`choices`."""

    @abstractmethod
    def validate(self, arch: Arch) -> None:
        """Raise :class:`SpaceError` naming the field and the allowed values if ``arch`` is outside the space."""

    @abstractmethod
    def largest(self) -> Arch:
        """Return the largest architecture (the full supernet)."""

    @abstractmethod
    def smallest(self) -> Arch:
        """Return the smallest architecture."""

    def sample(self, rng: np.random.Generator) -> Arch:
        """Draw one architecture uniformly over each decision, from a caller-seeded generator."""
        values = {key: options[int(rng.integers(len(options)))] for key, options in self.choices().items()}
        return self.arch_from_choices(values)

    def canonical(self, arch: Arch) -> Arch:
        """Return the one encoding of the network that ``arch`` builds, for de-duplication and cache keys.

        Spaces whose encoding contains values that the network ignores (Once-for-All's block slots
        beyond a stage's depth) override this; by default every encoding is its own.
        """
        return arch

    def arch_from_dict(self, data: Mapping[str, Any]) -> Arch:
        """Parse and validate an architecture mapping (for example from ``pareto.csv``)."""
        arch = self.arch_type.from_dict(data)
        self.validate(arch)
        return arch

    def arch_from_json(self, text: str) -> Arch:
        arch = self.arch_type.from_json(text)
        self.validate(arch)
        return arch

    # -- what the device runs -------------------------------------------------------------
    @abstractmethod
    def input_shape(self, arch: Arch) -> tuple[int, int, int]:
        """Return the (channels, height, width) of one input image for ``arch``."""

    @abstractmethod
    def layers(self, arch: Arch) -> list[LayerSpec]:
        """Return the units that ``arch`` runs, in execution order."""

    def macs(self, arch: Arch) -> int:
        """Multiply-accumulates of one forward pass for one image."""
        return sum(layer.macs for layer in self.layers(arch))

    def params(self, arch: Arch) -> int:
        """Trainable parameters of the exported subnet."""
        return sum(layer.params for layer in self.layers(arch))

    # -- models --------------------------------------------------------------------------
    @abstractmethod
    def build_supernet(self) -> Any:
        """Build the weight-sharing supernet (a :class:`nas.supernet.Supernet`)."""

    def width_choices(self) -> dict[str, list[int]]:
        """Return the decisions that set a channel count, for tail-aware width snapping."""
        return {}

    def with_width_choices(self, widths: Mapping[str, Sequence[int]]) -> SearchSpace:
        """Return a copy of this space whose width decisions take the given values."""
        raise NotImplementedError(f"Space family {self.family!r} has no elastic widths to replace.")

    def cache_config(self) -> dict[str, Any]:
        """Return the configuration that keys this space's caches (profiles, predictors, supernets).

        ``tail_aware`` counts as false: the search moves the widths only after it has profiled the
        space and trained the supernet, so a tail-aware run reuses a plain run's caches.
        """
        config = dict(self.raw_config)
        if "tail_aware" in config:
            config["tail_aware"] = False
        return config

    def config_hash(self) -> str:
        """Return a short hash of :meth:`cache_config`, for caches keyed by space."""
        text = json.dumps(self.cache_config(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_REGISTRY: dict[str, type[SearchSpace]] = {}


def register_space(family: str) -> Callable[[type[SearchSpace]], type[SearchSpace]]:
    """Register a :class:`SearchSpace` subclass under ``family`` (the ``family`` key in a space YAML)."""

    def decorator(cls: type[SearchSpace]) -> type[SearchSpace]:
        if family in _REGISTRY and _REGISTRY[family] is not cls:
            raise ValueError(f"Space family {family!r} is already registered by {_REGISTRY[family].__name__}.")
        cls.family = family
        _REGISTRY[family] = cls
        return cls

    return decorator


def list_families() -> list[str]:
    """Return the registered space families, sorted."""
    return sorted(_REGISTRY)


def create_space(config: Mapping[str, Any]) -> SearchSpace:
    """Build a search space from its configuration (a ``conf/space/*.yaml`` node)."""
    family = config.get("family")
    if family not in _REGISTRY:
        raise SpaceError(f"Unknown space family {family!r}; registered families are {list_families()}. A family "
                         "registered in your own module needs that module imported first (search.py and "
                         "predictors.*: imports=[your.module]; train.py takes it from the study).")
    return _REGISTRY[family](config)


def load_space_config(path: Any, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a space variant YAML outside Hydra, filling its ``${data.*}`` keys from ``data``.

    The default ``data`` is the bundled MNIST subset's: 1 channel, 10 classes, 28x28 images.
    """
    from pathlib import Path

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise SpaceError(f"Space file {str(path)!r} not found; variants in that folder are {available}.")
    values = {"in_channels": 1, "num_classes": 10, "resolution": 28, **dict(data or {})}
    root = OmegaConf.create({"data": values, "space": OmegaConf.load(path)})
    try:
        config = OmegaConf.to_container(root.space, resolve=True)
    except OmegaConfBaseException as err:
        raise SpaceError(f"Space file {str(path)} has a key that cannot be resolved ({err}); pass its value in data.") from err
    return config  # type: ignore[return-value]

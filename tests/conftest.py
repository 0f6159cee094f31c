"""Shared fixtures: small spaces and configs loaded the way Hydra would resolve them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep Weights & Biases and Hydra from reaching for the network or the user's settings in tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


def load_space_config(name: str, in_channels: int = 1, num_classes: int = 10) -> dict:
    """Load ``conf/space/<name>.yaml`` with the data interpolations filled in."""
    from nas.spaces import load_space_config as load

    return load(ROOT / "conf" / "space" / f"{name}.yaml", {"in_channels": in_channels, "num_classes": num_classes})


@pytest.fixture
def resnet_config() -> dict:
    return load_space_config("resnet")


@pytest.fixture
def resnet_space(resnet_config):
    from nas.spaces import create_space

    return create_space(resnet_config)


@pytest.fixture
def gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

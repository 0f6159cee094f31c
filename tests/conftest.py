"""Shared fixtures: small spaces and configs loaded the way Hydra would resolve them."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep Weights & Biases and Hydra from reaching for the network or the user's settings in tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


# Overrides that make the predictor and search stages of a tiny end-to-end run take seconds.
FAST_SEARCH = [
    "predictor.n_subnets=16",
    "predictor.width_step=32",
    "hardware.warmup=1",
    "hardware.repeats=3",
    "search.n_trials=6",
    "search.population_size=4",
    "search.timeout_s=120",
    "search.calibration_images=16",
]


def load_benchmark(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` as a module; it stays registered so that dataclasses and pickling find it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark_under_test", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_in_threads(target: Callable[[], Any], count: int, timeout_s: float) -> list[BaseException]:
    """Run ``target`` in ``count`` threads at once, wait up to ``timeout_s`` for each, and return what they raised."""
    import threading

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as err:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(err)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    return errors


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
def subnet(resnet_space):
    """Return a small eval-mode ResNet subnet for gate tests: widths 16/24/32, depths 1/2/1, 28x28 input."""
    import torch

    from nas.supernet.resnet import ResNetSubnet

    arch = resnet_space.arch_from_choices({"resolution": 28, "depth_0": 1, "width_0": 16, "depth_1": 2, "width_1": 24,
                                           "depth_2": 1, "width_2": 32})
    torch.manual_seed(0)
    return ResNetSubnet(resnet_space, arch).eval()


@pytest.fixture
def gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def staircase_ms(layer: Any) -> float:
    """Synthetic device: convolutions cost a fixed time per block of 16 output channels."""
    if layer.op == "conv":
        per_block = 2e-6 * layer.in_channels * layer.kernel_size**2 * layer.out_size**2
        return 0.01 + per_block * math.ceil(layer.out_channels / 16)
    return 0.005 + 1e-6 * layer.input_elements


def synthetic_records(
    space: Any, n_subnets: int, seed: int, noise: float | Callable[[Any], float] = 0.03, passes: int = 2,
    exclude: Collection[str] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Layer and subnet records in the profile store's format, on a device whose convolutions step every 16 channels.

    Each measurement has lognormal noise of ``noise``, or of ``noise(arch)`` when it is a function.
    Draws whose key is in ``exclude`` (the training subnets, for a held-out set) are drawn again.
    """
    rng = np.random.default_rng(seed)
    layers: dict[str, Any] = {}
    subnets = []
    for _ in range(n_subnets):
        arch = space.sample(rng)
        while arch.to_json() in exclude:
            arch = space.sample(rng)
        arch_layers = space.layers(arch)
        layers.update({layer.key(): layer for layer in arch_layers})
        true_ms = 0.9 * sum(staircase_ms(layer) for layer in arch_layers) + 0.02
        sigma = noise(arch) if callable(noise) else noise
        for index in range(passes):
            subnets.append(
                {
                    "kind": "subnet",
                    "key": arch.to_json(),
                    "arch": arch.to_dict(),
                    "layers": [layer.to_dict() for layer in arch_layers],
                    "pass": index,
                    "latency_ms": true_ms * math.exp(rng.normal(0.0, sigma)),
                }
            )
    layer_records = [
        {"kind": "layer", "key": key, "layer": layer.to_dict(), "pass": 0, "latency_ms": staircase_ms(layer)}
        for key, layer in layers.items()
    ]
    return layer_records, subnets


def skip_and_mask_outputs(gated: Any, x: Any) -> tuple[Any, Any]:
    """Return a gated block's eval outputs for ``x`` in "skip" mode and in "mask" mode, the reference."""
    import torch

    with torch.no_grad():
        gated.runtime.mode = "mask"
        masked = gated(x)
        gated.runtime.mode = "skip"
        skipped = gated(x)
    return skipped, masked


def interrupt_after(function: Callable[..., Any], calls: int) -> Callable[..., Any]:
    """Return ``function`` wrapped to raise ``KeyboardInterrupt`` on call number ``calls + 1``, as Ctrl-C would."""
    done = [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if done[0] == calls:
            raise KeyboardInterrupt
        done[0] += 1
        return function(*args, **kwargs)

    return interrupted


def assert_export_matches_eager(network: Any, dynamic_batch: bool, in_channels: int = 1, size: int = 28) -> None:
    """Export ``network`` with ``torch.export`` (batch 1, or a dynamic batch) and compare its outputs to eager."""
    import torch

    example = torch.randn(2 if dynamic_batch else 1, in_channels, size, size, generator=torch.Generator().manual_seed(1))
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic_batch else None
    with torch.no_grad():
        program = torch.export.export(network, (example,), dynamic_shapes=shapes)
        for batch in (1, 3) if dynamic_batch else (1,):
            x = torch.randn(batch, in_channels, size, size, generator=torch.Generator().manual_seed(batch))
            torch.testing.assert_close(program.module()(x), network(x), atol=1e-4, rtol=1e-4)

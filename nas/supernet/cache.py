"""Supernet checkpoints in the work directory, reused when space, data and training settings repeat."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nas.files import atomic_path
from nas.spaces.base import SearchSpace, create_space
from nas.supernet.base import Supernet

__all__ = ["CHECKPOINT_FORMAT_VERSION", "supernet_key", "save_supernet", "load_supernet", "CheckpointError"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1

# Version of each training schedule's code, part of the cache key. Raising one retrains the supernets
# that the schedule's earlier code produced. Progressive version 2 sorts ResNet channels by importance.
SCHEDULE_VERSIONS = {"sandwich": 1, "progressive": 2}


class CheckpointError(RuntimeError):
    """A supernet checkpoint that is missing, corrupt or of another format version."""


def supernet_key(space: SearchSpace, data: Mapping[str, Any], training: Mapping[str, Any], seed: int,
                 space_config: Mapping[str, Any] | None = None) -> str:
    """Return the cache key of a supernet: a hash of everything that changes its weights.

    ``space_config`` replaces ``space.cache_config()``; search.py passes ``space.raw_config`` to
    compute the key that tail-aware studies recorded before the caches shared it with plain runs.
    """
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "space": dict(space_config) if space_config is not None else space.cache_config(),
        "data": dict(data),
        "training": dict(training),
        "seed": seed,
    }
    schedule_version = SCHEDULE_VERSIONS.get(str(training.get("schedule", "sandwich")), 1)
    if schedule_version > 1:
        # Version 1 keys carry no entry, so the checkpoints cached before versions existed stay valid.
        payload["schedule_version"] = schedule_version
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_supernet(supernet: Supernet, path: Path, metadata: Mapping[str, Any]) -> None:
    """Write the supernet's tensors and the space configuration that rebuilds it (no pickled objects)."""
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "space": supernet.space.raw_config,
        "metadata": json.loads(json.dumps(dict(metadata), default=str)),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "state_dict": {k: v.detach().cpu() for k, v in supernet.state_dict().items()},
    }
    _atomic_torch_save(payload, path)
    log.info("Saved supernet checkpoint to %s", path)


def load_supernet(path: Path, space: SearchSpace | None = None) -> tuple[Supernet, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_supernet`; returns the supernet and its metadata.

    The space is rebuilt from the checkpoint unless ``space`` is given.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Supernet checkpoint {str(path)!r} not found; run search.py again to train it.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"Supernet checkpoint {str(path)!r} is corrupt or not a TailNAS checkpoint ({err}); "
            "delete it and run search.py again to retrain."
        ) from err
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"Supernet checkpoint {str(path)!r} has format version {version!r}, expected {CHECKPOINT_FORMAT_VERSION}; "
            "delete it and run search.py again to retrain."
        )
    space = space or create_space(payload["space"])
    supernet = space.build_supernet()
    supernet.load_state_dict(payload["state_dict"])
    return supernet, dict(payload.get("metadata", {}))

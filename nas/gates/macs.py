"""Multiply-accumulates a network actually runs on an input, gates included."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nas.gates.blocks import GatedResidualBlock

__all__ = ["executed_macs"]


def executed_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Return the MACs ``model`` runs on the batch ``x`` in eval mode, summed over the batch.

    Counts convolutions (2-D and 1-D) and linear layers as ``LayerSpec.macs`` does: one MAC per
    weight per output element, with pooling, BatchNorm, activations, masks and residual additions
    not counted. Gated blocks count what their current path computes: in "skip" mode at batch 1
    only the kept channels and columns, in "mask" mode the dense convolutions. The gates' own
    linear and 1-D convolution layers are included. The model returns to its previous training
    mode afterwards; divide by ``x.shape[0]`` for MACs per image.
    """
    counter = [0]

    def count(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        counter[0] += output.numel() * module.weight[0].numel()

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]
    runtimes = {id(b.runtime): b.runtime for b in model.modules() if isinstance(b, GatedResidualBlock)}
    was_training = model.training
    try:
        for runtime in runtimes.values():
            runtime.mac_counter = counter
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for runtime in runtimes.values():
            runtime.mac_counter = None
        for handle in handles:
            handle.remove()
    return counter[0]

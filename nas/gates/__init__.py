"""Dynamic redundancy gates: per-input channel and column skipping in fine-tuned subnets.

Typical use in fine-tuning (``docs/gates.md`` explains placement, paths and figures)::

    config = parse_gate_config(cfg.gates)
    gated = apply_gates(subnet, config, protocol=MeasurementProtocol.from_config(cfg.hardware))
    module = FinetuneModule(gated, teacher=subnet, kd_weight=config.kd_weight)
    trainer = pl.Trainer(callbacks=[KeepRatioSchedule.from_config(config)])

``apply_gates`` leaves ``subnet`` unchanged. After training, ``gated.eval()`` runs the skip path,
``gated.set_keep_ratio(r)`` trades accuracy for latency within ``keep_ratio_range``, and
``executed_macs(gated, x)`` counts what runs. After fine-tuning, ``calibrate_keep_ratios(gated,
loader, max_batches)`` (or the ``BatchNormCalibration`` callback) stores BatchNorm statistics per
keep ratio, which ``set_keep_ratio`` then switches. Save ``gated.describe()`` with the state dict
and rebuild with ``apply_gates(subnet, config, plan=record)`` before ``load_state_dict``.
"""

from nas.gates.batchnorm import BatchNormBank
from nas.gates.batchpath import BatchPathCosts
from nas.gates.blocks import BlockLayout, GatedResidualBlock, GateRuntime, gated_block_class, register_block_layout
from nas.gates.config import GateConfig, GateConfigError, TargetedDropoutConfig, parse_gate_config
from nas.gates.inverted import GatedInvertedResidual
from nas.gates.macs import executed_macs
from nas.gates.modules import ChannelGate, ColumnGate, keep_count, top_k_indices, top_k_mask
from nas.gates.network import (
    FORMAT_VERSION,
    GatedNetwork,
    apply_gates,
    confirm_budget,
    measure_batch_slowdown,
    timing_noise,
)
from nas.gates.planning import BlockPlan, BlockSite, describe_layers, find_block_sites
from nas.gates.training import (
    BatchNormCalibration,
    KeepRatioSchedule,
    calibrate_keep_ratios,
    calibration_ratios,
    find_gated_network,
    full_keep_logits,
)

__all__ = [
    "FORMAT_VERSION",
    "BatchNormBank",
    "BatchNormCalibration",
    "BatchPathCosts",
    "BlockLayout",
    "BlockPlan",
    "BlockSite",
    "ChannelGate",
    "ColumnGate",
    "GateConfig",
    "GateConfigError",
    "GateRuntime",
    "GatedInvertedResidual",
    "GatedNetwork",
    "GatedResidualBlock",
    "KeepRatioSchedule",
    "TargetedDropoutConfig",
    "apply_gates",
    "calibrate_keep_ratios",
    "calibration_ratios",
    "confirm_budget",
    "describe_layers",
    "executed_macs",
    "find_block_sites",
    "find_gated_network",
    "full_keep_logits",
    "gated_block_class",
    "keep_count",
    "measure_batch_slowdown",
    "parse_gate_config",
    "register_block_layout",
    "timing_noise",
    "top_k_indices",
    "top_k_mask",
]

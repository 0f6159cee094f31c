"""Residual blocks with a channel gate and a column gate on one inner feature map.

The gated map lies between a producer convolution (which makes it) and a consumer convolution
(which reads it and ends the residual branch). In a basic block the producer is ``conv1`` and the
consumer ``conv2``; in a bottleneck they are ``conv2`` (the 3x3 with the stride) and ``conv3``.
The residual path's output is never gated: every output channel and column is computed.

Paths through a block:

* training: the block's own modules (BatchNorm in training mode), then the inner map times a
  0/1 mask of the top-k selection and targeted dropout, with a straight-through gradient;
* eval, "mask": the same masking on dense convolutions with BatchNorm folded into the weights;
  this is the reference that "skip" must match;
* eval, "skip": the producer computes only the kept channels at the kept columns, and the
  consumer reads only those, so dropped work is not computed. :meth:`GatedResidualBlock._forward_channels`
  and :meth:`nas.gates.gathering.GatheredEvalPath._run_eval` say how batches above one are served.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas.gates.batchpath import BatchPathCosts
from nas.gates.folding import FoldedWeightCache, fold_conv_batchnorm
from nas.gates.gathering import GatheredEvalPath
# The registry lives in nas.gates.layouts; its names stay importable from here.
from nas.gates.layouts import BlockLayout, GateRuntime, block_layout, gated_block_class, register_block_layout
from nas.gates.modules import (
    ChannelGate,
    ColumnGate,
    row_mean,
    selection_union,
    straight_through,
    targeted_dropout_mask,
    top_k_indices,
    top_k_mask,
)

__all__ = [
    "BlockLayout",
    "GatedResidualBlock",
    "GateRuntime",
    "block_layout",
    "gated_block_class",
    "register_block_layout",
]

log = logging.getLogger(__name__)


def _in_place(act: nn.Module | None) -> Any:
    """Return a function that applies ``act`` to a freshly computed tensor, in place where it can."""
    if act is None or isinstance(act, nn.Identity):
        return None
    if type(act) is nn.ReLU:
        return torch.relu_
    if type(act) is nn.Hardswish:
        return functools.partial(F.hardswish, inplace=True)
    return act


class GatedResidualBlock(FoldedWeightCache, GatheredEvalPath):
    """A residual block whose inner map carries a channel gate, a column gate, or both.

    The block takes over the wrapped block's children under their own names, so its state dict is
    the ungated block's plus ``channel_gate.*`` and ``column_gate.*``.

    Args:
        block: the residual block to wrap (its children are shared, not copied).
        layout: where the gated map sits in ``block``.
        in_channels: channels of the block input.
        in_width: width in pixels of the block input.
        channel: whether to place a channel gate.
        spatial: whether to place a column gate.
        runtime: settings shared with the other blocks of the network.
    """

    def __init__(self, block: nn.Module, layout: BlockLayout, in_channels: int, in_width: int, channel: bool,
                 spatial: bool, runtime: GateRuntime) -> None:
        super().__init__()
        self.layout = layout
        self.runtime = runtime
        self._adopt_children(block)
        producer = self._stage_modules(layout.producer)[0]
        consumer = self._stage_modules(len(layout.stages) - 1)[0]
        self._check_convs(producer, consumer)
        # The last stage before the consumer sets the gated map's width: the producer, or a depthwise stage.
        widener = self._stage_modules(len(layout.stages) - 2)[0]

        self.inner_channels = producer.out_channels
        self.inner_width = (in_width + 2 * widener.padding[1] - widener.kernel_size[1]) // widener.stride[1] + 1
        self.out_channels = consumer.out_channels
        self.channel_gate = ChannelGate(in_channels, self.inner_channels) if channel else None
        self.column_gate = ColumnGate(in_channels, widener.stride[1]) if spatial else None
        self.kept_channels = self.inner_channels
        self.kept_columns = self.inner_width
        self._channel_path = self.supports_channel_path(layout)
        # Without measured path costs, batches above 1 keeping at most this many channels per image
        # take the grouped path.
        self._grouped_max_channels = 0
        self._batch_costs: BatchPathCosts | None = None
        # BatchNorm-folded weights; the cache's _plan is the last plan of _forward_channels:
        # (input area, kept channels, plan).
        self._init_fold_cache()

    # -- construction ---------------------------------------------------------------------------
    def _adopt_children(self, block: nn.Module) -> None:
        names = [name for stage in self.layout.stages for name in stage if name is not None]
        extra = [name for name in (self.layout.final_act, self.layout.squeeze_excite) if name is not None]
        for name in [*names, *extra, *self._shortcut_children()]:
            if not hasattr(block, name):
                raise ValueError(f"{type(block).__name__} has no child {name!r} that its BlockLayout names.")
            setattr(self, name, getattr(block, name))
        self.stride = getattr(block, "stride", 1)
        # A static block has a projection exactly where its shortcut needs one. Only the blocks of
        # nas.supernet.resnet set elastic_shortcut, so any other registered block always runs its downsample child.
        self.elastic_shortcut = getattr(block, "elastic_shortcut", False)

    def _shortcut_children(self) -> list[str]:
        """Child names of the shortcut path, adopted with the stages."""
        return ["downsample"]

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor | None:
        """Return what the residual branch is added to, or None when the block has no residual."""
        if self.downsample is not None and (not self.elastic_shortcut or self.stride != 1
                                            or x.shape[1] != self.out_channels):
            return self.downsample(x)
        return x

    def _stage_modules(self, index: int) -> tuple[nn.Module, nn.Module, nn.Module | None]:
        conv, bn, act = self.layout.stages[index]
        return getattr(self, conv), getattr(self, bn), getattr(self, act) if act is not None else None

    def _check_convs(self, producer: nn.Module, consumer: nn.Module) -> None:
        if self.layout.producer != len(self.layout.stages) - 2:
            raise ValueError(
                f"{type(self).__name__} needs the producer just before the consumer, but the layout has stages "
                f"{self.layout.stages[self.layout.producer + 1:-1]} between them; register the block with "
                "gated_class=GatedInvertedResidual when those stages are depthwise."
            )
        self._check_dense(producer, consumer)

    @staticmethod
    def _check_dense(producer: nn.Module, consumer: nn.Module) -> None:
        for role, conv in (("producer", producer), ("consumer", consumer)):
            if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1):
                raise ValueError(f"The {role} must be a dense nn.Conv2d without dilation, but got {conv}.")
            if conv.kernel_size[1] % 2 != 1 or conv.padding[1] != conv.kernel_size[1] // 2:
                raise ValueError(f"The {role} must have an odd kernel with 'same' padding, but got {conv}.")
        if consumer.stride != (1, 1):
            raise ValueError(f"The consumer convolution must have stride 1, but got {consumer}.")

    @classmethod
    def supports_channel_path(cls, layout: BlockLayout) -> bool:
        """Return whether blocks of ``layout`` can take :meth:`_forward_channels` (and so the grouped path).

        It needs the producer right before the consumer, with nothing between them.
        """
        return layout.producer == len(layout.stages) - 2 and layout.squeeze_excite is None

    @property
    def grouped_max_channels(self) -> int:
        """Largest kept-channel count at which batches above 1 take the grouped path (0: never).

        See :meth:`_forward_channels`. It applies only without :attr:`batch_costs`. ``placement:
        measure`` sets it where the grouped path was measured faster than the masked one.
        """
        return self._grouped_max_channels

    @grouped_max_channels.setter
    def grouped_max_channels(self, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= self.inner_channels:
            raise ValueError(f"grouped_max_channels must be an integer in [0, {self.inner_channels}], but got {value!r}.")
        self._grouped_max_channels = value

    @property
    def batch_costs(self) -> BatchPathCosts | None:
        """Measured costs of the grouped and gathered paths at a batch above 1, or None.

        With them, :meth:`_forward_channels` serves each batch above 1 on the cheaper path for the
        union of that batch's selections (:meth:`BatchPathCosts.choose`). ``placement: measure``
        sets them on blocks with a channel gate and no column gate that take the lean channel path
        (:meth:`supports_channel_path`).
        """
        return self._batch_costs

    @batch_costs.setter
    def batch_costs(self, value: BatchPathCosts | None) -> None:
        if value is not None:
            if not isinstance(value, BatchPathCosts):
                raise TypeError(f"batch_costs must be a BatchPathCosts or None, but got {type(value).__name__}.")
            if value.channels != self.inner_channels or (value.grouped and max(value.grouped) >= self.inner_channels):
                raise ValueError(f"batch_costs must time gathering up to the block's {self.inner_channels} inner "
                                 f"channels and grouping below them, but got {value!r}.")
        self._batch_costs = value

    @property
    def gated(self) -> bool:
        """Whether the block carries any gate."""
        return self.channel_gate is not None or self.column_gate is not None

    def set_keep(self, channels: int, columns: int) -> None:
        """Keep ``channels`` inner channels and ``columns`` inner columns per image (ignored without the gate)."""
        if not 1 <= channels <= self.inner_channels or not 1 <= columns <= self.inner_width:
            raise ValueError(
                f"kept channels must be in [1, {self.inner_channels}] and kept columns in [1, {self.inner_width}], "
                f"but got {channels} and {columns}."
            )
        self.kept_channels = channels if self.channel_gate is not None else self.inner_channels
        self.kept_columns = columns if self.column_gate is not None else self.inner_width

    # -- forward --------------------------------------------------------------------------------
    @property
    def keeps_all(self) -> bool:
        """Whether the current keep counts keep every inner channel and column, so the gates change nothing."""
        return self.kept_channels == self.inner_channels and self.kept_columns == self.inner_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The lean path applies in eval skip mode without column selection, outside tracing or when
        # exporting a static batch of 1. A traced dynamic batch cannot size tensors by a batch's
        # union, and under torch.compile its data-dependent branches break the graph. The test is
        # inline because a method call costs measurable time on this path.
        if (not self.training and self._channel_path and self.runtime.mode == "skip"
                and (self.column_gate is None or self.kept_columns == self.inner_width)
                and (not torch.compiler.is_compiling()
                     or (torch.compiler.is_exporting() and type(x.shape[0]) is int and x.shape[0] == 1))):
            return self._forward_channels(x)
        shortcut = self._shortcut(x)
        weights = None if self.training else self._folded_weights()

        channel_logits, column_logits = self._gate_logits(x, weights)
        inner = self._run_before_producer(x)

        if self.training:
            branch = self._run_train(inner, channel_logits, column_logits)
        else:
            branch = self._run_eval(inner, channel_logits, column_logits, weights)
        out = branch + shortcut if shortcut is not None else branch
        return getattr(self, self.layout.final_act)(out) if self.layout.final_act is not None else out

    def _run_before_producer(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stages before the producer (the 1x1 reduction of a bottleneck; none in a basic block)."""
        inner = x
        for index in range(self.layout.producer):
            conv, bn, act = self._stage_modules(index)
            inner = act(bn(conv(inner))) if act is not None else bn(conv(inner))
        return inner

    # -- channel-only eval path ----------------------------------------------------------------
    def _forward_channels(self, x: torch.Tensor) -> torch.Tensor:
        """Eval forward with channel selection only, in as few tensor operations as possible.

        This is the path a deployment takes, so its fixed cost decides whether a gate pays. On the
        2-core x86 CPU used in development, the general path's Python bookkeeping (cache checks,
        module lookups, mask handling) cost more per block call at batch 1 than a gate saved on a
        14x14 map. Everything that does not depend
        on the input (folded weights, the gate's scaled weights, strides, activations) comes from
        one cached plan, and the gate is one sum, one addmm and one top-k. Then, by batch size:

        * 1: the producer computes only the kept channels (gathered rows of its weights), and the
          consumer reads only those (gathered columns of its weights);
        * more, grouped: the same per image, as one grouped convolution with the batch as groups
          and each image's gathered weights as its group's filters;
        * more, gathered or dense: the union of the batch's selections, or all channels, and then
          each image's dropped channels are zeroed.

        With :attr:`batch_costs`, each batch takes the path measured cheapest for its kept count
        and its union's width. Without them, a kept count up to :attr:`grouped_max_channels` groups,
        and otherwise the union is gathered when at most ``skip_max_share`` of the channels remain.

        The outputs are those of "mask" mode for the same input.
        """
        batch, _, height, width = x.shape
        (pre_stages, gate, producer_w, producer_b, producer_conv, producer_act, consumer_w, consumer_b,
         consumer_conv, final_act) = self._channel_plan(height * width)
        counter = self.runtime.mac_counter
        shortcut = self._shortcut(x)
        inner = pre_stages(x) if pre_stages is not None else x
        groups, mask = 1, None
        if gate is not None:
            fc_t, fc_b, kept = gate
            logits = torch.addmm(fc_b, x.sum(dim=(2, 3)), fc_t)
            if counter is not None:
                counter[0] += self.channel_gate.macs * batch
            if batch == 1:
                index = logits.view(-1).topk(kept, sorted=False).indices
            else:
                top = top_k_indices(logits, kept)
                costs = self._batch_costs
                # Without costs the limit decides. With them, a union is computed unless grouping wins anyway.
                group = costs.always_grouped(kept) if costs is not None else kept <= self._grouped_max_channels
                if group:
                    path = "grouped"
                else:
                    selected, union = selection_union(logits, top)
                    if costs is not None:
                        path = costs.choose(kept, union.numel())
                    else:
                        wide = union.numel() > self.runtime.skip_max_share * self.inner_channels
                        path = "dense" if wide else "gathered"
                if path == "grouped":
                    index, groups = top.reshape(-1), batch
                    inner = inner.reshape(1, batch * inner.shape[1], inner.shape[2], inner.shape[3])
                elif path == "gathered":
                    index, mask = union, selected.index_select(1, union)
                else:
                    index, mask = None, selected
            if index is not None:
                producer_w, producer_b = producer_w.index_select(0, index), producer_b.index_select(0, index)
                consumer_w = consumer_w.index_select(1, index)
            if groups > 1:
                # (C_out, N * kept, kh, kw) -> (N * C_out, kept, kh, kw): image n's filters form group n.
                out_channels, _, kernel_h, kernel_w = consumer_w.shape
                consumer_w = (consumer_w.view(out_channels, batch, kept, kernel_h, kernel_w).transpose(0, 1)
                              .reshape(batch * out_channels, kept, kernel_h, kernel_w))
        hidden = F.conv2d(inner, producer_w, producer_b, producer_conv.stride, producer_conv.padding, 1, groups)
        if producer_act is not None:
            hidden = producer_act(hidden)
        if mask is not None:
            hidden = hidden.mul_(mask[:, :, None, None])
        out = F.conv2d(hidden, consumer_w, consumer_b if groups == 1 else None, consumer_conv.stride,
                       consumer_conv.padding, 1, groups)
        if counter is not None:
            counter[0] += hidden.numel() * producer_w[0].numel() + out.numel() * consumer_w[0].numel()
        if groups > 1:
            out = out.view(batch, -1, out.shape[2], out.shape[3]).add_(consumer_b[:, None, None])
        if shortcut is not None:
            out = out.add_(shortcut)
        return final_act(out) if final_act is not None else out

    def _channel_plan(self, area: int) -> tuple[Any, ...]:
        """Return what :meth:`_forward_channels` needs for inputs of ``area`` pixels, cached with the folded weights."""
        last = self._plan
        if last is not None and last[0] == area and last[1] == self.kept_channels and self._folded_is_current():
            return last[2]
        weights = self._folded_weights()
        producer, _, producer_act = self._stage_modules(self.layout.producer)
        consumer = self._stage_modules(len(self.layout.stages) - 1)[0]
        gate = None
        if self.channel_gate is not None and self.kept_channels < self.inner_channels:
            fc = self.channel_gate.fc
            # The mean over the map is a sum times 1/area, so the 1/area goes into the weights. The
            # general path reads the same entry, so an eager pass fills it for both.
            fc_t = self._cached(weights, ("channel_fc_t", area), lambda: (fc.weight.detach() / area).t().contiguous())
            gate = (fc_t, fc.bias.detach(), self.kept_channels)
        pre_stages = self._run_before_producer if self.layout.producer > 0 else None
        final_act = getattr(self, self.layout.final_act) if self.layout.final_act is not None else None
        plan = (pre_stages, gate, weights["producer_w"], weights["producer_b"], producer,
                _in_place(producer_act), weights["consumer_w"], weights["consumer_b"], consumer,
                _in_place(final_act))
        # A plan built while tracing contains traced tensors, which eager calls must not reuse.
        if not torch.compiler.is_compiling():
            self._plan = (area, self.kept_channels, plan)
        return plan

    def _gate_logits(self, x: torch.Tensor,
                     weights: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Keeping everything makes the 0/1 masks all ones: the gates are not even run.
        if not self.gated or self.keeps_all:
            return None, None
        if not self.training:
            return self._gate_logits_eval(x, weights)
        if self.column_gate is None:
            return self.channel_gate.logits(x.mean(dim=(2, 3))), None

        rows = row_mean(x)
        column_logits = self.column_gate.logits(rows)
        if self.channel_gate is None:
            return None, column_logits
        return self.channel_gate.logits(rows.mean(dim=2)), column_logits

    def _gate_logits_eval(self, x: torch.Tensor,
                          weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Score both gates from one sum over rows, with the 1/H and 1/(H*W) of the means in cached weights.

        At batch 1 on a CPU this halves the scoring time of the channel gate (one sum and one addmm
        instead of mean's sum, division and copy, then the linear layer's transpose and addmm). The
        gate modules are not called, so their MACs are counted here.
        """
        batch, _, height, width = x.shape
        channel_logits, column_logits, macs = None, None, 0
        if self.column_gate is None:
            sums = x.sum(dim=(2, 3))
        else:
            rows = x.sum(dim=2)
            gate = self.column_gate
            conv_w = self._cached(weights, ("column_conv", height), lambda: gate.conv.weight.detach() / height)
            pooled = F.avg_pool1d(rows, gate.stride, gate.stride, ceil_mode=True) if gate.stride > 1 else rows
            column_logits = F.conv1d(pooled, conv_w, gate.conv.bias.detach(), padding=gate.conv.padding).squeeze(1)
            macs += gate.macs(column_logits.shape[1])
            sums = rows.sum(dim=2) if self.channel_gate is not None else None
        if self.channel_gate is not None:
            fc = self.channel_gate.fc
            fc_t = self._cached(weights, ("channel_fc_t", height * width),
                                lambda: (fc.weight.detach() / (height * width)).t().contiguous())
            channel_logits = torch.addmm(fc.bias.detach(), sums, fc_t)
            macs += self.channel_gate.macs
        if self.runtime.mac_counter is not None:
            self.runtime.mac_counter[0] += macs * batch
        return channel_logits, column_logits

    @staticmethod
    def _cached(weights: dict[Any, torch.Tensor], key: Any, build: Any) -> torch.Tensor:
        if key not in weights:
            weights[key] = build()
        return weights[key]

    def _train_mask(self, logits: torch.Tensor, kept: int) -> torch.Tensor:
        mask = top_k_mask(logits.detach(), kept)
        if self.runtime.dropout_rate > 0 and self.runtime.dropout_fraction > 0:
            generator = self.runtime.dropout_generator(logits.device)
            mask = mask * targeted_dropout_mask(logits, self.runtime.dropout_fraction, self.runtime.dropout_rate,
                                                generator)
        return straight_through(mask, torch.sigmoid(logits))

    def _run_train(self, inner: torch.Tensor, channel_logits: torch.Tensor | None,
                   column_logits: torch.Tensor | None) -> torch.Tensor:
        hidden = inner
        for index in range(self.layout.producer, len(self.layout.stages) - 1):
            conv, bn, act = self._stage_modules(index)
            hidden = act(bn(conv(hidden)))

        if channel_logits is not None:
            hidden = hidden * self._train_mask(channel_logits, self.kept_channels)[:, :, None, None]
        if column_logits is not None:
            hidden = hidden * self._train_mask(column_logits, self.kept_columns)[:, None, None, :]
        if self.layout.squeeze_excite is not None:
            hidden = getattr(self, self.layout.squeeze_excite)(hidden)

        conv, bn, _ = self._stage_modules(len(self.layout.stages) - 1)
        return bn(conv(hidden))

    # -- folded weights (FoldedWeightCache) ---------------------------------------------------
    def _fold_weights(self) -> dict[str, torch.Tensor]:
        producer_conv, producer_bn, _ = self._stage_modules(self.layout.producer)
        consumer_conv, consumer_bn, _ = self._stage_modules(len(self.layout.stages) - 1)
        producer_w, producer_b = fold_conv_batchnorm(producer_conv, producer_bn)
        consumer_w, consumer_b = fold_conv_batchnorm(consumer_conv, consumer_bn)
        # Column form of the consumer: one (k, 1) filter per kernel column dx, stacked dx-major on
        # the output channels, so each kept input column can be convolved on its own.
        taps = consumer_w.shape[3]
        stacked = consumer_w.permute(3, 0, 1, 2).reshape(taps * consumer_w.shape[0], consumer_w.shape[1],
                                                           consumer_w.shape[2], 1)
        return {"producer_w": producer_w, "producer_b": producer_b, "consumer_w": consumer_w,
                "consumer_b": consumer_b, "consumer_columns_w": stacked.contiguous()}

    def _fold_source_modules(self) -> list[nn.Module]:
        """Return the modules whose own parameters and buffers the folded weights are computed from."""
        stages = self.layout.stages
        modules = [getattr(self, name) for name in (*stages[self.layout.producer][:2], *stages[-1][:2])]
        for gate in (self.channel_gate, self.column_gate):
            if gate is not None:
                modules.extend(gate.modules())
        return modules

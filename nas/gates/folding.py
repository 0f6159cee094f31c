"""BatchNorm-folded weights of gated blocks, cached until a source tensor changes.

In eval mode a gated block gathers rows and columns of its convolutions' weights per input, so it
works on weights with BatchNorm folded in. Folding on every call would cost more than a gate saves
on small maps, so :class:`FoldedWeightCache` keeps the folded tensors and rebuilds them only when
one of the tensors they come from changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FoldedWeightCache", "fold_conv_batchnorm"]


def fold_conv_batchnorm(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the weight and bias of ``conv`` followed by eval-mode ``bn`` (or ``nn.Identity``), detached."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, device=weight.device)
    if isinstance(bn, nn.Identity):
        return weight, bias
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale[:, None, None, None], (bias - bn.running_mean) * scale + bn.bias.detach()


class FoldedWeightCache(nn.Module):
    """Base module that caches weights computed from its children's tensors (BatchNorm folded into convolutions).

    Subclasses implement :meth:`_fold_weights` (the tensors to cache, by name) and
    :meth:`_fold_source_modules` (the modules whose own parameters and buffers those come from),
    and call :meth:`_init_fold_cache` in ``__init__``. ``self._plan`` contains anything a subclass
    derives from the folded weights, and it is dropped with them.

    An in-place update (optimizer step, ``load_state_dict``, a BatchNorm bank switching statistics)
    changes a source tensor's version, which :meth:`_folded_weights` notices. Replacing a child
    module (``fold_batchnorm``), moving or converting the module (``Module.to``, ``double``) and
    loading a state dict drop the cache through :meth:`__setattr__`, :meth:`_apply` and
    :meth:`_load_from_state_dict`.
    """

    def _init_fold_cache(self) -> None:
        # The source tensors and their versions when folded, the folded tensors, and what was derived from them.
        self._fold_refs: list[torch.Tensor] | None = None
        self._folded_key: list[int] = []
        self._folded: dict[Any, Any] = {}
        self._plan: Any = None

    def _fold_weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _fold_source_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _folded_weights(self) -> dict[Any, Any]:
        """Return the folded weights, rebuilt when any source tensor changed since they were folded."""
        if torch.compiler.is_compiling():
            # torch.export keeps weights folded before the trace as constants (export_program runs
            # an eager pass first). The copy keeps tensors traced later out of the eager cache.
            if torch.compiler.is_exporting() and self._folded and self._folded_is_current():
                return dict(self._folded)
            # Otherwise the trace runs on fake tensors, which have no versions, so it folds inline.
            return self._fold_weights()
        if not self._folded_is_current():
            refs = [t for m in self._fold_source_modules() for t in (*m._parameters.values(), *m._buffers.values())
                    if t is not None]
            self._folded = self._fold_weights()
            self._fold_refs = refs
            self._folded_key = [t._version for t in refs]
            self._plan = None
        return self._folded

    def _folded_is_current(self) -> bool:
        """Return whether folded weights are cached and no source tensor changed since they were folded."""
        refs = self._fold_refs
        return refs is not None and [t._version for t in refs] == self._folded_key

    def _drop_folded(self) -> None:
        self._fold_refs = None
        self._folded = {}
        self._plan = None

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, nn.Module) and "_fold_refs" in self.__dict__:
            self._drop_folded()
        super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> FoldedWeightCache:
        self._drop_folded()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_folded()
        super()._load_from_state_dict(*args, **kwargs)

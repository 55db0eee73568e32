"""What a LoHa / LoKr layer's forward runs: the delta weight ΔW once per call, never per token.

PEFT runs the base layer, then per adapter builds ΔW and adds `x·ΔWᵀ` (a convolution with ΔW for conv bases).
Here ΔW of all active adapters is summed first and applied in one op, and where the base is a plain float32/64
Linear or zero-padded Conv (no hooks, no extra forward arguments) it is folded into the base weight: one matmul
`x·(W + ΣΔW)ᵀ + b` instead of two, in forward and in backward (exact up to float rounding; 16-bit bases are never
folded, since rounding W + ΔW to 16 bits would round the delta away at W's scale, as a merge does).

16-bit activations with float32 adapters: PEFT casts x up and runs a float32 matmul. Here ΔW is cast down to x's
dtype instead (float32 accumulation; the same output within 16-bit rounding) when that pays: when the cast ΔW is
cached, or x has at least _MIN_ROWS_TO_CAST_DELTA rows (tokens, or positions of a convolution), so that the 16-bit
matmul's gain (GPUs, CPUs with bf16 instructions) outweighs casting ΔW and its gradient once per call.

In training the random draws are PEFT's, in its order, so that a seeded run matches it: per active adapter one
`torch.rand(1)` for module dropout (drawn even when module_dropout is 0, as PEFT does), then, if the adapter is
kept and rank_dropout is set, `torch.rand(out_features)` for its rows. Outside training the summed ΔW (or the
folded W + ΣΔW) is cached until a parameter of the adapters or the base changes identity, storage or version
(layer.py keeps the cache; the layer's events drop it).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

_FOLDABLE = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
# Below this many rows of x, casting an [out, in] ΔW (and, in backward, its gradient) to x's 16-bit dtype costs more
# than the float32 matmul over those rows that PEFT runs (measured on a CPU with bf16 instructions: 1 row loses,
# 16 win); decode in eval reads the cast ΔW from the cache whatever the rows.
_MIN_ROWS_TO_CAST_DELTA = 16


def run_op(layer, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x through the base layer's operation (linear, or convolution with its stride/padding/...) with `weight`."""
    if layer.kind == "Linear":
        return F.linear(x, weight, bias)
    m = layer.base_layer
    op = F.conv2d if layer.kind == "Conv2d" else F.conv1d
    return op(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


def compute_dtype(layer, x: torch.Tensor, adapter_dtype: torch.dtype, cached: bool) -> torch.dtype:
    """The dtype ΔW is applied in: x's for 16-bit x and float32 adapters when the cast pays (see above), else the
    adapters' (PEFT's cast of x)."""
    if x.dtype in _HALF and adapter_dtype == torch.float32 and \
            (cached or x.numel() // layer.in_features >= _MIN_ROWS_TO_CAST_DELTA):
        return x.dtype
    return adapter_dtype


def add_delta(layer, x: torch.Tensor, result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's `result + op(x, ΔW)` (bias already in result), returned in x's dtype."""
    return (result + run_op(layer, x.to(delta.dtype), delta, None)).to(x.dtype)


class DeltaPlan:
    """Forward for one set of active adapters. `fold`: the base's parameter dict when ΔW may be folded into its
    weight for inputs like the ones the plan was made for; parameters are read at call time."""

    __slots__ = ("layer", "active", "fold")

    def __init__(self, layer, active: list[str], fold: Optional[dict]):
        self.layer, self.active, self.fold = layer, active, fold

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        fold = self.fold if not (args or kwargs) else None
        if layer.training:
            delta = training_delta(layer, self.active)
            if delta is None:  # module dropout skipped every adapter
                return layer.base_layer(x, *args, **kwargs)
            if fold is not None:  # (back in x's dtype, as PEFT returns, also under autocast)
                return run_op(layer, x, fold["weight"] + delta, fold.get("bias")).to(x.dtype)
            delta = delta.to(compute_dtype(layer, x, delta.dtype, cached=False))
            return add_delta(layer, x, layer.base_layer(x, *args, **kwargs), delta)
        if fold is not None:
            weight = layer.delta_value(self.active, x.dtype, fold["weight"])
            return run_op(layer, x, weight, fold.get("bias")).to(x.dtype)
        dtype = compute_dtype(layer, x, layer.adapter_dtype(self.active), layer.caches(self.active))
        return add_delta(layer, x, layer.base_layer(x, *args, **kwargs), layer.delta_value(self.active, dtype))


def training_delta(layer, active: list[str]) -> Optional[torch.Tensor]:
    """ΣΔW over the adapters that module dropout keeps this call, drawing PEFT's random numbers in PEFT's order."""
    total = None
    for name in active:
        if not torch.rand(1) > layer.module_dropout[name]:
            continue
        delta = layer.get_delta_weight(name, apply_rank_dropout=bool(layer.rank_dropout[name]))
        total = delta if total is None else total + delta
    return total


def foldable(layer, x: torch.Tensor, active: list[str]) -> Optional[dict]:
    """The base's parameter dict when x·(W + ΣΔW)ᵀ may replace base(x) + x·ΣΔWᵀ for inputs like x: a plain base
    and one float32/64 dtype for x, W and the adapters."""
    view = layer.base_view
    fused = view.fused_dense() if layer.kind == "Linear" else view.fused_conv()
    if fused is None or x.dtype not in _FOLDABLE or fused[0].dtype != x.dtype:
        return None
    if any(p.dtype != x.dtype for name in active for p in layer.factors(name)):
        return None
    return view.module._parameters

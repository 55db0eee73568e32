"""Batched multi-adapter LoRA (Punica / S-LoRA / vLLM style): every token of a batch may use its own adapter.

A layer stacks its adapters into slots: a_stack [n_slots, r_max, in], b_stack [n_slots, out, r_max] (zero-padded
beyond each slot's rank, padding never read), ranks [n_slots] (0: this layer lacks the adapter), scalings
[n_slots], an optional bias_stack [n_slots, out] (PEFT's lora_bias) and, for DoRA adapters, dora_scale
[n_slots, out] with the base layer's bias (see lora_expand.py: the scale is folded into the expand's epilogue).
`make_lora_batch_meta` (common/batch_meta.py) groups the tokens by slot once per batch; the metadata is shared by
the shrink and the expand of every layer of the forward pass.
The reference is PEFT's `_mixed_batch_forward`, token rows instead of sample rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.backend import use_triton
from .common.batch_meta import LoraBatchMeta, apply_slot_delta, check_launch, slot_rows
from .lora_expand import check_expand_args, lora_expand_triton
from .lora_shrink import check_shrink_args, lora_shrink_triton

__all__ = ["multi_lora", "multi_lora_reference", "multi_lora_triton"]


def _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale=None, base_bias=None) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"multi_lora: x must be [T, in] and y [T, out]; got {tuple(x.shape)} and {tuple(y.shape)}")
    check_shrink_args(x, a_stack, ranks, meta)
    r_max = a_stack.shape[1]
    if b_stack.dim() != 3 or b_stack.shape[2] != r_max:
        raise ValueError(f"multi_lora: b_stack must be [n_slots, out, {r_max}], got {tuple(b_stack.shape)}")
    z_shape = torch.empty((y.shape[0], r_max), device="meta")  # only its shape is checked: no memory
    check_expand_args(y, z_shape, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)


def multi_lora_reference(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                         meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *, inplace: bool = False,
                         dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None) -> Tensor:
    """PEFT's `_mixed_batch_forward`: result[idx] += (lora_B(lora_A(x[idx].to(A.dtype))) * scaling).to(result.dtype);
    DoRA slots: PEFT's DoRA output for those rows, as if that adapter ran alone."""
    _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    result = y if inplace else y.clone()
    rank_list = ranks.tolist()
    for s, rows in slot_rows(meta):
        r = min(int(rank_list[s]), a_stack.shape[1])
        if r == 0:
            continue
        a, b = a_stack[s, :r], b_stack[s, :, :r]
        bias = bias_stack[s].to(b.dtype) if bias_stack is not None else None
        # F.linear as PEFT's nn.Linear modules call it: addmm with the bias, bit for bit on CPU.
        delta = F.linear(F.linear(x[rows].to(a.dtype), a), b, bias) * scalings[s].to(b.dtype)
        apply_slot_delta(result, rows, delta, dora_scale, s, base_bias)
    return result


def multi_lora_triton(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                      meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *, inplace: bool = False,
                      dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None) -> Tensor:
    """Two launches whatever the number of adapters: lora_shrink into an fp32 z [T, r_max], then lora_expand."""
    _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    check_launch("multi_lora", x, y, a_stack, b_stack, ranks, scalings, bias_stack, meta.sorted_tokens, dora_scale,
                  base_bias)
    result = y if inplace else y.clone()
    z = lora_shrink_triton(x, a_stack, ranks, meta)
    return lora_expand_triton(result, z, b_stack, ranks, scalings, meta, bias_stack, dora_scale=dora_scale,
                              base_bias=base_bias)


def multi_lora(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
               meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *, inplace: bool = False,
               dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None) -> Tensor:
    """y + each token's own LoRA delta (tokens of slot -1 or of a rank-0 slot keep y exactly), in y's dtype.

    inplace=False (default) leaves y alone and returns a new tensor; inplace=True adds into y and returns it,
    which is what a layer wants for its freshly computed base output.
    """
    kw = dict(inplace=inplace, dora_scale=dora_scale, base_bias=base_bias)
    if use_triton(x, y, a_stack, b_stack, meta.sorted_tokens):
        return multi_lora_triton(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, **kw)
    return multi_lora_reference(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, **kw)

"""Batched multi-adapter LoRA (Punica / S-LoRA / vLLM style): every token of a batch may use its own adapter.

A layer stacks its adapters into slots: a_stack [n_slots, r_max, in], b_stack [n_slots, out, r_max] (zero-padded
beyond each slot's rank, padding never read), ranks [n_slots] (0: this layer lacks the adapter), scalings
[n_slots], an optional bias_stack [n_slots, out] (PEFT's lora_bias) and, for DoRA adapters, dora_scale
[n_slots, out] with the base layer's bias (see lora_expand.py: the scale is folded into the expand's epilogue). `make_lora_batch_meta` groups the tokens
by slot once per batch; the metadata is shared by the shrink and the expand of every layer of the forward pass.
The reference is PEFT's `_mixed_batch_forward`, token rows instead of sample rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import use_triton
from .lora_expand import _check_shapes as _check_expand
from .lora_expand import apply_delta, lora_expand_triton
from .lora_shrink import _check_launch, _check_shapes as _check_shrink, _slot_rows, lora_shrink_triton

__all__ = ["LoraBatchMeta", "make_lora_batch_meta", "multi_lora", "multi_lora_reference", "multi_lora_triton"]


@dataclass
class LoraBatchMeta:
    """Token-to-adapter mapping of one batch. Tensors live on the batch's device; ints are host values."""

    token_slots: Tensor  # int32 [T]: slot of each token, -1 = no adapter
    sorted_tokens: Tensor  # int32 [n_assigned]: indices of tokens with a slot, grouped by slot, in token order
    slot_starts: Tensor  # int32 [n_slots]: where each slot's tokens begin in sorted_tokens
    slot_counts: Tensor  # int32 [n_slots]: how many tokens each slot has
    active_slots: Tensor  # int32 [n_active]: slots with at least one token, increasing
    num_tokens: int  # T
    max_slot_tokens: int  # most tokens of any one slot: sizes the kernels' grids
    n_slots: int

    @property
    def num_active(self) -> int:
        return self.active_slots.numel()


def make_lora_batch_meta(token_slots: Union[Tensor, Sequence[int]], n_slots: int,
                         device: Optional[Union[str, torch.device]] = None) -> LoraBatchMeta:
    """Group the tokens by slot. One host sync (validation and grid sizes), paid once per batch."""
    slots = torch.as_tensor(token_slots, device=device)
    if slots.dim() != 1 or slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise ValueError(f"make_lora_batch_meta: token_slots must be a 1-D integer tensor, got {slots.dtype} "
                         f"of shape {tuple(slots.shape)}")
    n_slots = int(n_slots)
    if n_slots < 0:
        raise ValueError(f"make_lora_batch_meta: n_slots must be >= 0, got {n_slots}")
    T = slots.numel()
    # -1 (and, until validated, anything out of range) sorts last under key n_slots.
    key = torch.where((slots < 0) | (slots >= n_slots), n_slots, slots).long()
    counts = torch.bincount(key, minlength=n_slots + 1)[:n_slots]
    extremes = torch.stack([slots.min(), slots.max()]).long() if T else counts.new_full((2,), -1)
    host = torch.cat([extremes, counts]).tolist()  # the one host sync
    lo, hi, host_counts = host[0], host[1], host[2:]
    if lo < -1 or hi >= n_slots:
        raise ValueError(f"make_lora_batch_meta: token_slots must lie in [-1, {n_slots}) (-1 = no adapter, else a "
                         f"slot of the {n_slots} stacked adapters); got values from {lo} to {hi}")
    order = torch.sort(key, stable=True).indices  # stable: a slot's tokens keep their batch order
    active = [s for s, c in enumerate(host_counts) if c > 0]
    return LoraBatchMeta(
        token_slots=slots.to(torch.int32).contiguous(),
        sorted_tokens=order[:sum(host_counts)].to(torch.int32).contiguous(),
        slot_starts=(torch.cumsum(counts, 0) - counts).to(torch.int32),
        slot_counts=counts.to(torch.int32),
        active_slots=torch.tensor(active, dtype=torch.int32).to(slots.device),
        num_tokens=T,
        max_slot_tokens=max(host_counts, default=0),
        n_slots=n_slots,
    )


def _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale=None, base_bias=None) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"multi_lora: x must be [T, in] and y [T, out]; got {tuple(x.shape)} and {tuple(y.shape)}")
    _check_shrink(x, a_stack, ranks, meta)
    r_max = a_stack.shape[1]
    if b_stack.dim() != 3 or b_stack.shape[2] != r_max:
        raise ValueError(f"multi_lora: b_stack must be [n_slots, out, {r_max}], got {tuple(b_stack.shape)}")
    z_shape = torch.empty((y.shape[0], r_max), device="meta")  # only its shape is checked: no memory
    _check_expand(y, z_shape, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)


def multi_lora_reference(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                         meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *, inplace: bool = False,
                         dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None) -> Tensor:
    """PEFT's `_mixed_batch_forward`: result[idx] += (lora_B(lora_A(x[idx].to(A.dtype))) * scaling).to(result.dtype);
    DoRA slots: PEFT's DoRA output for those rows, as if that adapter ran alone."""
    _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    result = y if inplace else y.clone()
    rank_list = ranks.tolist()
    for s, rows in _slot_rows(meta):
        r = min(int(rank_list[s]), a_stack.shape[1])
        if r == 0:
            continue
        a, b = a_stack[s, :r], b_stack[s, :, :r]
        bias = bias_stack[s].to(b.dtype) if bias_stack is not None else None
        # F.linear as PEFT's nn.Linear modules call it: addmm with the bias, bit for bit on CPU.
        delta = F.linear(F.linear(x[rows].to(a.dtype), a), b, bias) * scalings[s].to(b.dtype)
        apply_delta(result, rows, delta, dora_scale, s, base_bias)
    return result


def multi_lora_triton(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                      meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *, inplace: bool = False,
                      dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None) -> Tensor:
    """Two launches whatever the number of adapters: lora_shrink into an fp32 z [T, r_max], then lora_expand."""
    _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    _check_launch("multi_lora", x, y, a_stack, b_stack, ranks, scalings, bias_stack, meta.sorted_tokens, dora_scale,
                  base_bias)
    result = y if inplace else y.clone()
    if meta.num_active == 0:
        return result
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

"""Multi-adapter LoRA expand: y[t] += scaling_s · (z[t, :rank_s] · b_stack[s, :, :rank_s]ᵀ + bias_stack[s]).

The second half of a mixed batch (`multi_lora.py`). It adds IN PLACE into y and returns y: the caller hands it
a fresh output (the base layer's result, or a clone), so the batch needs no second [T, out] buffer. Rows of
tokens without an adapter, and of slots whose rank is 0 (the layer lacks that adapter), are never touched.
Only z[:, :rank_s] is read, so whatever the shrink left beyond a slot's rank does not matter.

DoRA slots (`dora_scale` [n_slots, out], c = m / ||W + s·B·A|| per output channel; 1 for plain LoRA slots): PEFT's
DoRA output is y + (c - 1)·(y - b) + c·delta, with y the base output and b the base layer's bias (`base_bias`),
which DoRA must not scale. The expand applies it in its epilogue, so DoRA and LoRA adapters share one launch;
with c = 1 the extra term is an exact zero, so LoRA slots stay bit-identical to the plain expand.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .common.backend import HAS_TRITON, use_triton
from .common.batch_meta import LoraBatchMeta, check_launch, slot_rows, slot_update
from .common.dot_policy import dot_mode, precision
from .common.tiling import cdiv, np2
from .common.launch import launch

__all__ = ["lora_expand", "lora_expand_reference", "lora_expand_triton", "check_expand_args"]


def check_expand_args(y: Tensor, z: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor, meta: LoraBatchMeta,
                  bias_stack: Optional[Tensor], dora_scale: Optional[Tensor] = None,
                  base_bias: Optional[Tensor] = None) -> None:
    if y.dim() != 2 or z.dim() != 2 or b_stack.dim() != 3:
        raise ValueError(f"lora_expand: y must be [T, out], z [T, r_max] and b_stack [n_slots, out, r_max]; got "
                         f"{tuple(y.shape)}, {tuple(z.shape)}, {tuple(b_stack.shape)}")
    n, out_f, r_max = b_stack.shape
    if y.shape != (meta.num_tokens, out_f) or z.shape != (meta.num_tokens, r_max) or n != meta.n_slots:
        raise ValueError(f"lora_expand: y {tuple(y.shape)}, z {tuple(z.shape)} and b_stack {tuple(b_stack.shape)} "
                         f"do not match a batch of {meta.num_tokens} tokens over {meta.n_slots} slots")
    if ranks.shape != (n,) or scalings.shape != (n,):
        raise ValueError(f"lora_expand: ranks and scalings must have shape ({n},); got {tuple(ranks.shape)} and "
                         f"{tuple(scalings.shape)}")
    if bias_stack is not None and bias_stack.shape != (n, out_f):
        raise ValueError(f"lora_expand: bias_stack must have shape ({n}, {out_f}), got {tuple(bias_stack.shape)}")
    if dora_scale is not None and dora_scale.shape != (n, out_f):
        raise ValueError(f"lora_expand: dora_scale must have shape ({n}, {out_f}), got {tuple(dora_scale.shape)}")
    if base_bias is not None and (dora_scale is None or base_bias.shape != (out_f,)):
        raise ValueError(f"lora_expand: base_bias (shape ({out_f},)) only goes with dora_scale; got "
                         f"{tuple(base_bias.shape)}{'' if dora_scale is not None else ' without dora_scale'}")


def lora_expand_reference(y: Tensor, z: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                          meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *,
                          dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None) -> Tensor:
    """PEFT's lora_B and scaling on z, per active slot, in the adapter dtype; adds into y in place."""
    check_expand_args(y, z, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    rank_list = ranks.tolist()
    for s, rows in slot_rows(meta):
        r = min(int(rank_list[s]), b_stack.shape[2])
        if r == 0:
            continue
        b = b_stack[s, :, :r]
        bias = bias_stack[s].to(b.dtype) if bias_stack is not None else None
        delta = F.linear(z[rows, :r].to(b.dtype), b, bias) * scalings[s].to(b.dtype)
        y[rows] = slot_update(y[rows], delta, dora_scale, s, base_bias)
    return y


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common.jit import acc_zeros, dot_operands, slot_epilogue

    @triton.jit
    def _lora_expand_kernel(
        z_ptr, b_ptr, y_ptr, bias_ptr, scal_ptr, ranks_ptr, tokens_ptr, starts_ptr, counts_ptr, tile_slots_ptr,
        tile_rows_ptr, dscale_ptr, bbias_ptr,
        N, R_MAX, N_SLOTS,
        stride_zm, stride_zr, stride_bs, stride_bn, stride_br, stride_ym, stride_yn, stride_biass, stride_biasn,
        stride_dss, stride_dsn,
        HAS_BIAS: tl.constexpr, HAS_DORA: tl.constexpr, HAS_BBIAS: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Axis 0 (launched fastest) walks the out tiles of one token tile: its z rows stay in L2 meanwhile.
        pid_n = tl.program_id(0)
        tile = tl.program_id(1)
        slot = tl.load(tile_slots_ptr + tile)
        if slot >= N_SLOTS:  # past the batch's real tiles
            return
        count = tl.load(counts_ptr + slot)
        rank = tl.minimum(tl.load(ranks_ptr + slot), R_MAX)
        # Rank 0: the layer lacks this adapter; its tokens keep the base output, lora bias included.
        if rank == 0:
            return
        offs_m = tl.load(tile_rows_ptr + tile) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        start = tl.load(starts_ptr + slot)
        tok = tl.load(tokens_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        acc = acc_zeros(BLOCK_M, BLOCK_N, DOT)
        # The slot's own rank bounds the loop: a rank-8 slot beside a rank-64 one does one step, not r_max/BLOCK_R.
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < rank
            a = tl.load(z_ptr + tok[:, None] * stride_zm + rr[None, :] * stride_zr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_base + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            a, b = dot_operands(a, b, DOT)
            acc += tl.dot(a, b, input_precision=PRECISION)
        slot_epilogue(acc, slot, tok, rn, mask_m, mask_n, y_ptr, bias_ptr, scal_ptr, dscale_ptr, bbias_ptr,
                      stride_ym, stride_yn, stride_biass, stride_biasn, stride_dss, stride_dsn,
                      HAS_BIAS, HAS_DORA, HAS_BBIAS)


def _expand_blocks(out_f: int, r_max: int) -> tuple[int, int]:
    # BLOCK_N 64 keeps a prefill program at 64x64 outputs with a [64, BLOCK_N] fp32 accumulator; BLOCK_R makes
    # the largest slot take about four rank steps, so smaller slots stop early at a fine grain.
    bn = min(64, max(16, np2(out_f)))
    br = min(64, max(16, np2(r_max) // 4))
    return bn, br


def lora_expand_triton(y: Tensor, z: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                       meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *,
                       dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None) -> Tensor:
    """One launch for every adapter of the batch; adds into y in place and returns it."""
    if not HAS_TRITON:
        raise RuntimeError("lora_expand_triton needs triton, which is not installed; use lora_expand_reference.")
    check_expand_args(y, z, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    check_launch("lora_expand", y, z, b_stack, ranks, scalings, bias_stack, meta.sorted_tokens, meta.slot_starts,
                  meta.tile_slots, dora_scale, base_bias)
    ranks, scalings = ranks.contiguous(), scalings.contiguous()  # read at ptr + slot, without a stride
    out_f, r_max = b_stack.shape[1], b_stack.shape[2]
    if meta.max_tiles == 0 or meta.n_slots == 0 or out_f == 0 or r_max == 0:
        return y
    dot = dot_mode(z.dtype, b_stack.dtype, y.dtype)
    bm = meta.block_m
    bn, br = _expand_blocks(out_f, r_max)
    grid = (cdiv(out_f, bn), meta.max_tiles)
    bias = bias_stack if bias_stack is not None else b_stack
    dscale = dora_scale if dora_scale is not None else b_stack
    bbias = base_bias.contiguous() if base_bias is not None else b_stack
    launch(_lora_expand_kernel, grid,
        z, b_stack, y, bias, scalings, ranks, meta.sorted_tokens, meta.slot_starts, meta.slot_counts,
        meta.tile_slots, meta.tile_rows, dscale, bbias,
        out_f, r_max, meta.n_slots,
        z.stride(0), z.stride(1), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        y.stride(0), y.stride(1), bias.stride(0), bias.stride(-1), dscale.stride(0), dscale.stride(-1),
        HAS_BIAS=bias_stack is not None, HAS_DORA=dora_scale is not None, HAS_BBIAS=base_bias is not None,
        DOT=dot, PRECISION=precision(dot),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
    )
    return y


def lora_expand(y: Tensor, z: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor, meta: LoraBatchMeta,
                bias_stack: Optional[Tensor] = None, *, dora_scale: Optional[Tensor] = None,
                base_bias: Optional[Tensor] = None) -> Tensor:
    """y[t] += scaling_s·(z[t, :rank_s]·B_s[:, :rank_s]ᵀ + bias_s) for each token t of slot s; in place, returns y.
    With dora_scale: y[t] = y[t] + (c_s - 1)·(y[t] - base_bias) + c_s·delta (PEFT's DoRA output)."""
    if use_triton(y, z, b_stack, scalings, meta.sorted_tokens):
        return lora_expand_triton(y, z, b_stack, ranks, scalings, meta, bias_stack, dora_scale=dora_scale,
                                  base_bias=base_bias)
    return lora_expand_reference(y, z, b_stack, ranks, scalings, meta, bias_stack, dora_scale=dora_scale,
                                 base_bias=base_bias)

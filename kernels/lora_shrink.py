"""Multi-adapter LoRA shrink: z[t, :rank_s] = x[t] · a_stack[s, :rank_s]ᵀ for every token t of slot s.

The first half of a Punica/S-LoRA style mixed batch (common/batch_meta.py holds the batch metadata,
`multi_lora.py` the whole op).
z is float32 (float64 when x or a_stack is float64) of shape [T, r_max], allocated zeroed: rows of tokens
without an adapter (or of a rank-0 slot), and columns at or beyond their slot's rank, are guaranteed exactly 0.
The expand never reads them; the zeros are there so that nobody else can read garbage either.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.backend import HAS_TRITON, use_triton
from .common.batch_meta import LoraBatchMeta, check_launch, slot_rows
from .common.dot_policy import dot_mode, precision
from .common.tiling import cdiv, np2, num_sms, z_dtype
from .common.launch import launch

__all__ = ["lora_shrink", "lora_shrink_reference", "lora_shrink_triton", "check_shrink_args"]


def check_shrink_args(x: Tensor, a_stack: Tensor, ranks: Tensor, meta: LoraBatchMeta) -> None:
    if x.dim() != 2 or a_stack.dim() != 3:
        raise ValueError(f"lora_shrink: x must be [T, in] and a_stack [n_slots, r_max, in]; got {tuple(x.shape)} "
                         f"and {tuple(a_stack.shape)}")
    if x.shape[0] != meta.num_tokens or a_stack.shape[0] != meta.n_slots or a_stack.shape[2] != x.shape[1]:
        raise ValueError(f"lora_shrink: x {tuple(x.shape)} and a_stack {tuple(a_stack.shape)} do not match a batch "
                         f"of {meta.num_tokens} tokens over {meta.n_slots} slots")
    if ranks.shape != (meta.n_slots,):
        raise ValueError(f"lora_shrink: ranks must have shape ({meta.n_slots},), got {tuple(ranks.shape)}")


def lora_shrink_reference(x: Tensor, a_stack: Tensor, ranks: Tensor, meta: LoraBatchMeta) -> Tensor:
    """Per active slot, x[tokens] cast to the adapter dtype times A[:rank]ᵀ, as PEFT's lora_A computes it."""
    check_shrink_args(x, a_stack, ranks, meta)
    z = torch.zeros((x.shape[0], a_stack.shape[1]), device=x.device, dtype=z_dtype(x, a_stack))
    rank_list = ranks.tolist()
    for s, rows in slot_rows(meta):
        r = min(int(rank_list[s]), a_stack.shape[1])
        if r > 0:
            a = a_stack[s, :r]
            z[rows, :r] = F.linear(x[rows].to(a.dtype), a).to(z.dtype)
    return z


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common.jit import acc_zeros, dot_operands

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr, a_ptr, z_ptr, ranks_ptr, tokens_ptr, starts_ptr, counts_ptr, tile_slots_ptr, tile_rows_ptr,
        K, R_MAX, N_SLOTS, k_tiles,
        stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_zm, stride_zr,
        DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Axis 0 (launched fastest) walks the rank tiles and K splits of one token tile, so its x rows are
        # fetched from HBM once and re-read from L2; axis 1 walks the tile table (a slot's tiles are adjacent,
        # so its A stays in L2 meanwhile).
        pid_rk = tl.program_id(0)
        tile = tl.program_id(1)
        slot = tl.load(tile_slots_ptr + tile)
        if slot >= N_SLOTS:  # past the batch's real tiles
            return
        pid_r = pid_rk // SPLIT_K
        pid_k = pid_rk % SPLIT_K
        count = tl.load(counts_ptr + slot)
        rank = tl.minimum(tl.load(ranks_ptr + slot), R_MAX)
        # The grid is sized for the largest rank: smaller ranks' spare programs leave here, so a rank-8 adapter
        # never touches, nor multiplies, the zero padding up to r_max.
        if pid_r * BLOCK_R >= rank:
            return
        offs_m = tl.load(tile_rows_ptr + tile) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        start = tl.load(starts_ptr + slot)
        tok = tl.load(tokens_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rr < rank
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        acc = acc_zeros(BLOCK_M, BLOCK_R, DOT)
        k_start = pid_k * k_tiles * BLOCK_K
        for kt in range(0, k_tiles):
            rk = (k_start + kt * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            a = tl.load(x_ptr + tok[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(a_base + rk[:, None] * stride_ak + rr[None, :] * stride_ar,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            a, b = dot_operands(a, b, DOT)
            acc += tl.dot(a, b, input_precision=PRECISION)
        z_ptrs = z_ptr + tok[:, None] * stride_zm + rr[None, :] * stride_zr
        mask_z = mask_m[:, None] & mask_r[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask_z)
        else:
            tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask_z)


def _shrink_blocks(r_max: int, K: int) -> tuple[int, int]:
    # BLOCK_R: the largest slot spans two rank tiles, so a slot of rank <= r_max/2 pays for half the tiles or
    # fewer; smaller tiles would make the largest slot re-read its x rows from L2 more times for little gain.
    br = min(64, max(16, np2(r_max) // 2))
    bk = min(64, max(16, np2(K)))
    return br, bk


def _split_k(tiles: int, K: int, bk: int, z: Tensor) -> int:
    # Decode (one token per slot) gives few tiles over a long `in`: most SMs would idle, so split K and add the
    # partial sums atomically into the zeroed z. Atomics reorder the sum, so never in deterministic mode.
    sms = num_sms(z.device)
    if tiles >= sms or K < 4 * bk or torch.are_deterministic_algorithms_enabled():
        return 1
    return max(1, min(cdiv(K, 2 * bk), cdiv(2 * sms, tiles)))


def lora_shrink_triton(x: Tensor, a_stack: Tensor, ranks: Tensor, meta: LoraBatchMeta,
                       split_k: Optional[int] = None) -> Tensor:
    """One launch for every adapter of the batch. `split_k` overrides the heuristic (1 = never split)."""
    if not HAS_TRITON:
        raise RuntimeError("lora_shrink_triton needs triton, which is not installed; use lora_shrink_reference.")
    check_shrink_args(x, a_stack, ranks, meta)
    check_launch("lora_shrink", x, a_stack, ranks, meta.sorted_tokens, meta.slot_starts, meta.tile_slots)
    ranks = ranks.contiguous()  # read at ranks_ptr + slot (a view of every other entry would be misread)
    T, K = x.shape
    r_max = a_stack.shape[1]
    z = torch.zeros((T, r_max), device=x.device, dtype=z_dtype(x, a_stack))
    if meta.max_tiles == 0 or meta.n_slots == 0 or r_max == 0 or K == 0:
        return z
    dot = dot_mode(x.dtype, a_stack.dtype, z.dtype)
    bm = meta.block_m
    br, bk = _shrink_blocks(r_max, K)
    r_tiles, k_tiles = cdiv(r_max, br), cdiv(K, bk)
    split = _split_k(cdiv(T, bm) * r_tiles, K, bk, z) if split_k is None else max(1, int(split_k))
    if split > 1:
        per_split = cdiv(k_tiles, split)
        split = cdiv(k_tiles, per_split)  # no split left without K tiles
        k_tiles = per_split
    grid = (r_tiles * split, meta.max_tiles)
    launch(_lora_shrink_kernel, grid,
        x, a_stack, z, ranks, meta.sorted_tokens, meta.slot_starts, meta.slot_counts, meta.tile_slots,
        meta.tile_rows, K, r_max, meta.n_slots, k_tiles,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2), z.stride(0), z.stride(1),
        DOT=dot, PRECISION=precision(dot), SPLIT_K=split, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
    )
    return z


def lora_shrink(x: Tensor, a_stack: Tensor, ranks: Tensor, meta: LoraBatchMeta) -> Tensor:
    """z [T, r_max] (fp32, fp64 for fp64): x[t]·a_stack[s, :rank_s]ᵀ per token of slot s, zeros elsewhere."""
    if use_triton(x, a_stack, ranks, meta.sorted_tokens):
        return lora_shrink_triton(x, a_stack, ranks, meta)
    return lora_shrink_reference(x, a_stack, ranks, meta)

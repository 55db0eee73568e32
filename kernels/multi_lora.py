"""Batched multi-adapter LoRA (Punica / S-LoRA / vLLM style): every token of a batch may use its own adapter.

A layer stacks its adapters into slots: a_stack [n_slots, r_max, in], b_stack [n_slots, out, r_max] (zero-padded
beyond each slot's rank, padding never read), ranks [n_slots] (0: this layer lacks the adapter), scalings
[n_slots], an optional bias_stack [n_slots, out] (PEFT's lora_bias) and, for DoRA adapters, dora_scale
[n_slots, out] with the base layer's bias (see lora_expand.py: the scale is folded into the expand's epilogue).
`make_lora_batch_meta` (common/batch_meta.py) groups the tokens by slot once per batch; the metadata is shared by
the shrink and the expand of every layer of the forward pass. A decode batch (a few tokens) runs both halves in one
launch instead, each program keeping its tile's z in registers.
The reference is PEFT's `_mixed_batch_forward`, token rows instead of sample rows.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.backend import HAS_TRITON, use_triton
from .common.batch_meta import LoraBatchMeta, check_launch, rows_update, slot_update
from .common.dot_policy import dot_mode, precision
from .common.tiling import cdiv, np2, z_dtype
from .lora_expand import check_expand_args, lora_expand_triton
from .lora_shrink import check_shrink_args, lora_shrink_triton
from .common.launch import launch
from .common.lora_decode import DECODE_MAX_A_BYTES
from .common.rank_buckets import bucket_deltas, bucket_plan

__all__ = ["multi_lora", "multi_lora_", "multi_lora_reference", "multi_lora_triton"]


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
    DoRA slots: PEFT's DoRA output for those rows, as if that adapter ran alone. Adapters that share a rank run
    together as batched matmuls (common/rank_buckets.py), equal to PEFT's within rounding. Where they cannot (every
    rank different, one adapter, token counts too uneven), adapter by adapter, bit for bit PEFT's, with one gather of
    x and y and one write back for the whole batch (each adapter reads a contiguous run of the sorted rows)."""
    _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    result = y if inplace else y.clone()
    starts, counts, rows = meta.host_groups()
    rank_list = ranks.tolist()
    r_max = a_stack.shape[1]

    def groups():  # (slot, start among the sorted rows, count, rank) of every adapter with tokens here
        return [(s, start, count, r) for s, (start, count) in enumerate(zip(starts, counts))
                if count > 0 and (r := min(int(rank_list[s]), r_max)) > 0]

    plan = meta.plan((tuple(rank_list), r_max), lambda: bucket_plan(groups(), rows.tolist()))
    if plan is not None:
        delta = bucket_deltas(x, a_stack, b_stack, scalings, bias_stack, plan)
        tokens = plan.tokens.to(x.device)
        if dora_scale is None:
            return result.index_add_(0, tokens, delta.to(result.dtype))
        update = rows_update(result.index_select(0, tokens), delta, dora_scale, plan.token_slots.to(x.device),
                             base_bias)
        return result.index_copy_(0, tokens, update)
    xs, ys = x.index_select(0, rows), result.index_select(0, rows)
    new = ys.clone()
    for s, start, count, r in groups():
        a, b = a_stack[s, :r], b_stack[s, :, :r]
        bias = bias_stack[s].to(b.dtype) if bias_stack is not None else None
        # F.linear as PEFT's nn.Linear modules call it: addmm with the bias, bit for bit on CPU.
        delta = F.linear(F.linear(xs[start:start + count].to(a.dtype), a), b, bias) * scalings[s].to(b.dtype)
        new[start:start + count] = slot_update(ys[start:start + count], delta, dora_scale, s, base_bias)
    return result.index_copy_(0, rows, new)


# Up to this many tokens (decode) the whole delta runs as one launch: each program recomputes its tile's z for its
# out tile instead of writing z to memory for a second launch. Above it, the rows are many and the two launches'
# one z per tile wins. As for a single adapter's decode (common/lora_decode.py), a slot's A is re-read by every out
# tile, so a slot larger than DECODE_MAX_A_BYTES takes the two launches too. (The crossovers are for
# bench/gpu_check.sh to confirm on a GPU: test_bench_multi_lora.py's kernel rows time one launch against two.)
FUSED_MAX_TOKENS = 16


def fuses(meta: LoraBatchMeta, a_stack: Tensor) -> bool:
    """Whether a batch takes the one-launch path: decode-sized, with slots small enough to re-read per out tile."""
    return (meta.num_tokens <= FUSED_MAX_TOKENS
            and a_stack.shape[1] * a_stack.shape[2] * a_stack.element_size() <= DECODE_MAX_A_BYTES)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common.jit import acc_zeros, dot_operands, rows_times_a, slot_epilogue

    @triton.jit
    def _multi_lora_fused_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr, bias_ptr, scal_ptr, ranks_ptr, tokens_ptr, starts_ptr, counts_ptr,
        tile_slots_ptr, tile_rows_ptr, dscale_ptr, bbias_ptr,
        K, N, R_MAX, N_SLOTS,
        stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_bs, stride_bn, stride_br,
        stride_ym, stride_yn, stride_biass, stride_biasn, stride_dss, stride_dsn,
        HAS_BIAS: tl.constexpr, HAS_DORA: tl.constexpr, HAS_BBIAS: tl.constexpr,
        DOT_A: tl.constexpr, DOT_B: tl.constexpr, PRECISION_A: tl.constexpr, PRECISION_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """lora_shrink and lora_expand of one token tile and one out tile in one program: z never leaves
        registers. The same tile table, masks, rank bounds and epilogue as the two kernels."""
        pid_n = tl.program_id(0)
        tile = tl.program_id(1)
        slot = tl.load(tile_slots_ptr + tile)
        if slot >= N_SLOTS:
            return
        count = tl.load(counts_ptr + slot)
        rank = tl.minimum(tl.load(ranks_ptr + slot), R_MAX)
        if rank == 0:  # this layer lacks the adapter: its tokens keep the base output
            return
        offs_m = tl.load(tile_rows_ptr + tile) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        start = tl.load(starts_ptr + slot)
        tok = tl.load(tokens_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        acc = acc_zeros(BLOCK_M, BLOCK_N, DOT_B)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < rank
            z = rows_times_a(x_ptr, a_base, tok, rr, mask_m, mask_r, K, stride_xm, stride_xk, stride_ak, stride_ar,
                             DOT_A, PRECISION_A, BLOCK_M, BLOCK_R, BLOCK_K)
            bb = tl.load(b_base + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            z, bb = dot_operands(z, bb, DOT_B)
            acc += tl.dot(z, bb, input_precision=PRECISION_B)
        slot_epilogue(acc, slot, tok, rn, mask_m, mask_n, y_ptr, bias_ptr, scal_ptr, dscale_ptr, bbias_ptr,
                      stride_ym, stride_yn, stride_biass, stride_biasn, stride_dss, stride_dsn,
                      HAS_BIAS, HAS_DORA, HAS_BBIAS)


def _fused(x, result, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias) -> Tensor:
    K, (n, out_f, r_max) = x.shape[1], b_stack.shape
    if meta.max_tiles == 0 or n == 0 or out_f == 0 or r_max == 0:
        return result
    zd = z_dtype(x, a_stack)
    dot_a, dot_b = dot_mode(x.dtype, a_stack.dtype, zd), dot_mode(zd, b_stack.dtype, result.dtype)
    bn = min(128, max(16, np2(out_f)))
    br = min(64, max(16, np2(r_max)))
    bk = min(128, max(16, np2(K)))
    bias = bias_stack if bias_stack is not None else b_stack
    dscale = dora_scale if dora_scale is not None else b_stack
    bbias = base_bias.contiguous() if base_bias is not None else b_stack
    launch(_multi_lora_fused_kernel, (cdiv(out_f, bn), meta.max_tiles),
        x, a_stack, b_stack, result, bias, scalings, ranks, meta.sorted_tokens, meta.slot_starts, meta.slot_counts,
        meta.tile_slots, meta.tile_rows, dscale, bbias,
        K, out_f, r_max, meta.n_slots,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), result.stride(0), result.stride(1),
        bias.stride(0), bias.stride(-1), dscale.stride(0), dscale.stride(-1),
        HAS_BIAS=bias_stack is not None, HAS_DORA=dora_scale is not None, HAS_BBIAS=base_bias is not None,
        DOT_A=dot_a, DOT_B=dot_b, PRECISION_A=precision(dot_a), PRECISION_B=precision(dot_b),
        BLOCK_M=meta.block_m, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk,
    )
    return result


def multi_lora_triton(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                      meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *, inplace: bool = False,
                      dora_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None,
                      fused: Optional[bool] = None) -> Tensor:
    """One launch for a decode batch of small slots (`fuses`), else two (lora_shrink into an fp32 z [T, r_max], then
    lora_expand), whatever the number of adapters. `fused` forces one or the other."""
    if not HAS_TRITON:
        raise RuntimeError("multi_lora_triton needs triton, which is not installed; use multi_lora_reference.")
    _check(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
    check_launch("multi_lora", x, y, a_stack, b_stack, ranks, scalings, bias_stack, meta.sorted_tokens, dora_scale,
                  base_bias)
    result = y if inplace else y.clone()
    if fused if fused is not None else fuses(meta, a_stack):  # (the two-launch path's launchers do the same)
        ranks, scalings = ranks.contiguous(), scalings.contiguous()  # read at ptr + slot, without a stride
        return _fused(x, result, a_stack, b_stack, ranks, scalings, meta, bias_stack, dora_scale, base_bias)
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


@torch.library.custom_op("peft_fast::multi_lora_", mutates_args=("y",))
def _multi_lora_op(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                   token_slots: Tensor, sorted_tokens: Tensor, slot_starts: Tensor, slot_counts: Tensor,
                   tile_slots: Tensor, tile_rows: Tensor, block_m: int, bias_stack: Optional[Tensor],
                   dora_scale: Optional[Tensor], base_bias: Optional[Tensor]) -> None:
    meta = _batch_meta(token_slots, sorted_tokens, slot_starts, slot_counts, tile_slots, tile_rows,
                       a_stack.shape[0], block_m)
    multi_lora(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, inplace=True, dora_scale=dora_scale,
               base_bias=base_bias)


_metas = threading.local()  # per thread: the last few batches' metadata, as the compiled graph's layers call in turn


def _batch_meta(token_slots: Tensor, *tensors: Tensor) -> LoraBatchMeta:
    """The op's LoraBatchMeta. A compiled graph hands each layer the batch's tensors, not the eager forward's one
    meta object, so on the CPU (where the reference plans on the host) a batch already seen gets its meta back, with
    the host groups and plans its first layer made, instead of every layer planning again."""
    *others, n_slots, block_m = tensors
    meta = LoraBatchMeta(token_slots, *others, token_slots.numel(), n_slots, block_m)
    if token_slots.device.type != "cpu":
        return meta
    key = (n_slots, block_m, token_slots.numpy().tobytes())  # the metadata is a function of these alone
    seen = getattr(_metas, "seen", None)
    if seen is None:
        seen = _metas.seen = {}
    if key in seen:
        return seen[key]
    if len(seen) >= 8:
        seen.pop(next(iter(seen)))
    seen[key] = meta
    return meta


@_multi_lora_op.register_fake
def _(x, y, a_stack, b_stack, ranks, scalings, token_slots, sorted_tokens, slot_starts, slot_counts, tile_slots,
      tile_rows, block_m, bias_stack, dora_scale, base_bias) -> None:
    return None


def multi_lora_(x: Tensor, y: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scalings: Tensor,
                meta: LoraBatchMeta, bias_stack: Optional[Tensor] = None, *, dora_scale: Optional[Tensor] = None,
                base_bias: Optional[Tensor] = None) -> Tensor:
    """`multi_lora(..., inplace=True)` for callers that may be traced: under torch.compile it is one opaque op (no
    graph break, the Triton launches or the reference run inside it; CUDA graphs capture the launches), eagerly a
    plain call. Inference only. Returns y."""
    if torch.compiler.is_compiling():
        _multi_lora_op(x, y, a_stack, b_stack, ranks, scalings, meta.token_slots, meta.sorted_tokens,
                       meta.slot_starts, meta.slot_counts, meta.tile_slots, meta.tile_rows, meta.block_m,
                       bias_stack, dora_scale, base_bias)
        return y
    return multi_lora(x, y, a_stack, b_stack, ranks, scalings, meta, bias_stack, inplace=True,
                      dora_scale=dora_scale, base_bias=base_bias)

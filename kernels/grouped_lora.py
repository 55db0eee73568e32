"""Grouped LoRA over routed tokens (mixture-of-experts): delta[t] = s · x[t] · A_eᵀ · B_eᵀ for each row t of expert e.

Experts play the role of a mixed batch's adapter slots: one LoraBatchMeta (common/batch_meta.py) groups the rows by
expert, and the whole layer's delta is the multi-adapter shrink and expand (lora_shrink.py, lora_expand.py) over
a3 [E, r, in] and b3 [E, out, r], which may be strided views (PEFT keeps B as one [out, r·E] matrix, expert e being
its columns e, e+E, ...). The backward is the same two launches on the transposed views for dx, plus one grouped
weight-gradient launch each for dA and dB (`_grouped_wgrad_kernel`: per expert, the sum over its rows of gᵀh).
Rows whose expert id lies outside [0, E) (expert parallelism's sentinels) get a zero delta and no gradient.

Three paths, one result: the reference loops over the experts (PEFT's math per expert); the Triton path launches
twice forward and four times backward whatever the number of experts; where Triton does not run (CPU), float32 and
16-bit operands take torch's grouped matmul, also without a loop over experts. Under torch.compile both fast
paths are custom ops, so a compiled step over them stays one graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.autograd import FusedOp, needs_grad
from .common.backend import HAS_TRITON, use_triton
from .common.batch_meta import LoraBatchMeta, check_launch, make_lora_batch_meta, slot_rows
from .common.dot_policy import dot_mode, precision
from .common.tiling import cdiv, np2
from .lora_expand import lora_expand_triton
from .lora_shrink import lora_shrink_triton
from .common.launch import launch

__all__ = ["grouped_lora", "grouped_lora_reference", "grouped_lora_triton", "grouped_lora_torch",
           "experts_meta", "check_grouped_lora_args"]


def experts_meta(expert_ids: Tensor, num_experts: int) -> LoraBatchMeta:
    """The rows' grouping by expert, built once per experts layer forward and shared by its projections."""
    return make_lora_batch_meta(expert_ids.reshape(-1), num_experts, validate=False)


def check_grouped_lora_args(x: Tensor, a3: Tensor, b3: Tensor, meta: LoraBatchMeta) -> None:
    if x.dim() != 2 or a3.dim() != 3 or b3.dim() != 3:
        raise ValueError(f"grouped_lora: x must be [N, in], a3 [E, r, in] and b3 [E, out, r]; got {tuple(x.shape)}, "
                         f"{tuple(a3.shape)}, {tuple(b3.shape)}")
    E, r, in_f = a3.shape
    if b3.shape[0] != E or b3.shape[2] != r or x.shape[1] != in_f:
        raise ValueError(f"grouped_lora: x {tuple(x.shape)}, a3 {tuple(a3.shape)} and b3 {tuple(b3.shape)} do not "
                         "fit together")
    if meta.n_slots != E or meta.num_tokens != x.shape[0]:
        raise ValueError(f"grouped_lora: the metadata groups {meta.num_tokens} rows into {meta.n_slots} experts; x "
                         f"has {x.shape[0]} rows and the adapter {E} experts")


def grouped_lora_reference(x: Tensor, a3: Tensor, b3: Tensor, scaling: float, meta: LoraBatchMeta) -> Tensor:
    """Per expert, as PEFT's LoRA computes it: lora_B(lora_A(x_e)) * scaling, in the adapter dtype; [N, out]."""
    check_grouped_lora_args(x, a3, b3, meta)
    out = x.new_zeros(x.shape[0], b3.shape[1], dtype=a3.dtype)
    for e, rows in slot_rows(meta):
        out = out.index_put((rows,), F.linear(F.linear(x[rows].to(a3.dtype), a3[e]), b3[e]) * scaling)
    return out


def _grouped_mm_ok(*ts: Tensor) -> bool:
    return hasattr(torch, "_grouped_mm") and all(t.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                                 and t.dtype == ts[0].dtype for t in ts)


def _grouped_mm_layout(m: Tensor) -> bool:
    """A 3-D operand torch._grouped_mm reads as it is: row- or column-major matrices, 16-byte aligned strides."""
    size = m.element_size()
    if m.stride(2) == 1:
        return m.stride(1) * size % 16 == 0
    return m.stride(1) == 1 and m.stride(2) * size % 16 == 0


def _torch_delta(x: Tensor, a3: Tensor, b3: Tensor, scaling: float, counts: Tensor) -> Tensor:
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    # Rows past the last group (no expert here) are left unwritten by _grouped_mm, forward and backward: masking
    # them on the way in zeroes their input gradient, on the way out their delta.
    keep = torch.arange(x.shape[0], device=x.device)[:, None] < offs[-1]
    z = torch._grouped_mm(torch.where(keep, x.to(a3.dtype), 0.0), a3.transpose(1, 2), offs=offs)
    bt = b3.transpose(1, 2)  # [E, r, out]: column-major when b3 is [E, out, r] contiguous (kernel_factors)
    if not _grouped_mm_layout(bt):  # PEFT's own layout strides the experts innermost: one small copy
        bt = bt.contiguous()
    delta = torch._grouped_mm(z, bt, offs=offs) * scaling
    return torch.where(keep, delta, delta.new_zeros(()))


def _torch_forward(x: Tensor, a3: Tensor, b3: Tensor, scaling: float, counts: Tensor) -> tuple[Tensor]:
    return (_torch_delta(x, a3, b3, scaling, counts),)


def _torch_forward_fake(x, a3, b3, scaling, counts):
    return (x.new_empty((x.shape[0], b3.shape[1]), dtype=a3.dtype),)


def _torch_backward_impl(grad: Tensor, x: Tensor, a3: Tensor, b3: Tensor, scaling: float, counts: Tensor,
                         need_dx: bool, need_da: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of the compiled CPU path, per expert (autograd does not record inside a custom op, and the
    grouped matmul's weight-gradient form wants 16-byte aligned ranks); an unneeded gradient comes back empty.
    Eager training never comes here: it differentiates the grouped matmuls directly."""
    g, xa = grad.to(a3.dtype), x.to(a3.dtype)
    dx = torch.zeros_like(xa) if need_dx else x.new_empty(0)
    da = torch.zeros_like(a3) if need_da else a3.new_empty(0)
    db = torch.zeros_like(b3) if need_db else b3.new_empty(0)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            rows = slice(start, start + c)
            dz = (g[rows] @ b3[e]) * scaling  # [c, r]
            if need_dx:
                dx[rows] = dz @ a3[e]
            if need_da:
                da[e] = dz.t() @ xa[rows]
            if need_db:
                db[e] = (g[rows].t() @ (xa[rows] @ a3[e].t())) * scaling
        start += c
    return dx.to(x.dtype) if need_dx else dx, da, db


def _torch_backward_fake(grad, x, a3, b3, scaling, counts, need_dx, need_da, need_db):
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0) for t, need in ((x, need_dx), (a3, need_da),
                                                                                  (b3, need_db)))


def _torch_setup_context(ctx, inputs, output):
    x, a3, b3, scaling, counts = inputs
    ctx.save_for_backward(x, a3, b3, counts)
    ctx.scaling, ctx.needs = scaling, tuple(t.requires_grad for t in (x, a3, b3))


def _torch_backward(ctx, grad, *, bwd):
    x, a3, b3, counts = ctx.saved_tensors
    dx, da, db = bwd(grad, x, a3, b3, ctx.scaling, counts, *ctx.needs)
    return dx if ctx.needs[0] else None, da if ctx.needs[1] else None, db if ctx.needs[2] else None, None, None


# One custom op under torch.compile: tracing torch._grouped_mm itself takes bf16 only (its fake implementation).
_TORCH_OP = FusedOp("grouped_lora_torch", forward=_torch_forward, forward_fake=_torch_forward_fake,
                    backward_impl=_torch_backward_impl, backward_fake=_torch_backward_fake,
                    setup_context=_torch_setup_context, backward=_torch_backward)


def grouped_lora_torch(x: Tensor, a3: Tensor, b3: Tensor, scaling: float, meta: LoraBatchMeta) -> Tensor:
    """torch._grouped_mm twice, differentiated by autograd; under torch.compile one custom op. Needs the rows
    already sorted by expert, as an experts layer holds them (meta.sorted_tokens the identity); float32/16-bit
    operands."""
    check_grouped_lora_args(x, a3, b3, meta)
    if torch.compiler.is_compiling():
        return _TORCH_OP(x, a3, b3, float(scaling), meta.slot_counts, needs_grad=needs_grad(x, a3, b3))
    return _torch_delta(x, a3, b3, float(scaling), meta.slot_counts)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common.jit import acc_zeros, dot_operands

    @triton.jit
    def _grouped_wgrad_kernel(
        g_ptr, h_ptr, out_ptr, tokens_ptr, starts_ptr, counts_ptr, P, Q, scale,
        stride_gm, stride_gp, stride_hm, stride_hq, stride_oe, stride_op, stride_oq,
        DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        # out[e] = scale · Σ_{rows t of expert e} g[t]ᵀ h[t]: one program per (expert, output tile), walking the
        # expert's rows; an expert without rows writes zeros (its gradient).
        pid_pq = tl.program_id(0)
        e = tl.program_id(1)
        q_tiles = tl.cdiv(Q, BLOCK_Q)
        pp = (pid_pq // q_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        qq = (pid_pq % q_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask_p, mask_q = pp < P, qq < Q
        start = tl.load(starts_ptr + e)
        count = tl.load(counts_ptr + e)
        acc = acc_zeros(BLOCK_P, BLOCK_Q, DOT)
        for t0 in range(0, count, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            mask_t = rows < count
            tok = tl.load(tokens_ptr + start + rows, mask=mask_t, other=0).to(tl.int64)
            g = tl.load(g_ptr + tok[None, :] * stride_gm + pp[:, None].to(tl.int64) * stride_gp,
                        mask=mask_p[:, None] & mask_t[None, :], other=0.0)
            h = tl.load(h_ptr + tok[:, None] * stride_hm + qq[None, :].to(tl.int64) * stride_hq,
                        mask=mask_t[:, None] & mask_q[None, :], other=0.0)
            g, h = dot_operands(g, h, DOT)
            acc += tl.dot(g, h, input_precision=PRECISION)
        ptrs = out_ptr + e.to(tl.int64) * stride_oe + pp[:, None] * stride_op + qq[None, :] * stride_oq
        tl.store(ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


def _wgrad(g: Tensor, h: Tensor, meta: LoraBatchMeta, scale: float, dtype: torch.dtype) -> Tensor:
    """[E, P, Q]: scale · g_eᵀ h_e per expert e, g [N, P] and h [N, Q] gathered through the metadata."""
    P, Q = g.shape[1], h.shape[1]
    out = torch.empty((meta.n_slots, P, Q), device=g.device, dtype=dtype)
    if meta.n_slots == 0 or P == 0 or Q == 0:
        return out.zero_()
    check_launch("grouped_lora", g, h, meta.sorted_tokens, meta.slot_starts, meta.slot_counts)
    dot = dot_mode(g.dtype, h.dtype, torch.float64 if dtype == torch.float64 else torch.float32)
    bp, bq = min(64, max(16, np2(P))), min(64, max(16, np2(Q)))
    grid = (cdiv(P, bp) * cdiv(Q, bq), meta.n_slots)
    launch(_grouped_wgrad_kernel, grid,
        g, h, out, meta.sorted_tokens, meta.slot_starts, meta.slot_counts, P, Q, float(scale),
        g.stride(0), g.stride(1), h.stride(0), h.stride(1), out.stride(0), out.stride(1), out.stride(2),
        DOT=dot, PRECISION=precision(dot), BLOCK_T=32, BLOCK_P=bp, BLOCK_Q=bq,
    )
    return out


def _meta(token_slots: Tensor, sorted_tokens: Tensor, starts: Tensor, counts: Tensor, tile_slots: Tensor,
          tile_rows: Tensor, n_slots: int, block_m: int) -> LoraBatchMeta:
    return LoraBatchMeta(token_slots, sorted_tokens, starts, counts, tile_slots, tile_rows, token_slots.numel(),
                         n_slots, block_m)


def _rank_scale(a3: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    E, r = a3.shape[0], a3.shape[1]
    sdtype = torch.float64 if a3.dtype == torch.float64 else torch.float32  # the scale exact as the math
    return (torch.full((E,), r, dtype=torch.int32, device=a3.device),
            torch.full((E,), float(scaling), dtype=sdtype, device=a3.device))


def _forward(x: Tensor, a3: Tensor, b3: Tensor, scaling: float, token_slots: Tensor, sorted_tokens: Tensor,
             starts: Tensor, counts: Tensor, tile_slots: Tensor, tile_rows: Tensor, n_slots: int,
             block_m: int) -> tuple[Tensor, Tensor]:
    meta = _meta(token_slots, sorted_tokens, starts, counts, tile_slots, tile_rows, n_slots, block_m)
    ranks, scalings = _rank_scale(a3, scaling)
    # PEFT's B strides the experts innermost: every kernel would read it scattered. Callers that keep B
    # contiguous [E, out, r] (LoraParam.kernel_factors) skip this copy.
    b3 = b3.contiguous()
    z = lora_shrink_triton(x, a3, ranks, meta)
    y = torch.zeros((x.shape[0], b3.shape[1]), device=x.device, dtype=a3.dtype)
    lora_expand_triton(y, z, b3, ranks, scalings, meta)
    return y, z


def _forward_fake(x, a3, b3, scaling, token_slots, sorted_tokens, starts, counts, tile_slots, tile_rows, n_slots,
                  block_m):
    return (x.new_empty((x.shape[0], b3.shape[1]), dtype=a3.dtype),
            x.new_empty((x.shape[0], a3.shape[1]), dtype=torch.float64 if torch.float64 in (x.dtype, a3.dtype)
                        else torch.float32))


def _backward_impl(grad: Tensor, x: Tensor, a3: Tensor, b3: Tensor, z: Tensor, scaling: float, token_slots: Tensor,
                   sorted_tokens: Tensor, starts: Tensor, counts: Tensor, tile_slots: Tensor, tile_rows: Tensor,
                   n_slots: int, block_m: int, need_dx: bool, need_da: bool,
                   need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB): dx by the shrink and expand on the transposed stacks, dA and dB by the grouped weight-gradient
    kernel; an unneeded gradient comes back empty (custom ops cannot return None)."""
    meta = _meta(token_slots, sorted_tokens, starts, counts, tile_slots, tile_rows, n_slots, block_m)
    ranks, scalings = _rank_scale(a3, scaling)
    grad = grad.contiguous()
    dz = lora_shrink_triton(grad, b3.transpose(1, 2).contiguous(), ranks, meta)  # g·B_e, [N, r]
    dx, da, db = x.new_empty(0), a3.new_empty(0), b3.new_empty(0)
    if need_dx:
        dx = torch.zeros((x.shape[0], x.shape[1]), device=x.device, dtype=torch.promote_types(x.dtype, a3.dtype))
        lora_expand_triton(dx, dz, a3.transpose(1, 2), ranks, scalings, meta)  # s·(g·B_e)·A_e
        dx = dx.to(x.dtype)
    if need_da:
        da = _wgrad(dz, x, meta, scaling, a3.dtype)  # s·(g·B_e)ᵀ·x_e
    if need_db:
        db = _wgrad(grad, z, meta, scaling, b3.dtype)  # s·gᵀ·(x_e·A_eᵀ)
    return dx, da, db


def _backward_fake(grad, x, a3, b3, z, scaling, token_slots, sorted_tokens, starts, counts, tile_slots, tile_rows,
                   n_slots, block_m, need_dx, need_da, need_db):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), a3.new_empty(a3.shape) if need_da else
            a3.new_empty(0), b3.new_empty(b3.shape) if need_db else b3.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, a3, b3, scaling, *meta = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, a3, b3, z, *meta[:6])
    ctx.scaling, ctx.sizes = scaling, meta[6:]
    ctx.needs = tuple(t.requires_grad for t in (x, a3, b3))


def _backward(ctx, grad, _dz, *, bwd):
    x, a3, b3, z, *meta = ctx.saved_tensors
    dx, da, db = bwd(grad, x, a3, b3, z, ctx.scaling, *meta, *ctx.sizes, *ctx.needs)
    return (dx if ctx.needs[0] else None, da if ctx.needs[1] else None, db if ctx.needs[2] else None,
            *([None] * 9))


_OP = FusedOp("grouped_lora", forward=_forward, forward_fake=_forward_fake, backward_impl=_backward_impl,
              backward_fake=_backward_fake, setup_context=_setup_context, backward=_backward) if HAS_TRITON else None


def grouped_lora_triton(x: Tensor, a3: Tensor, b3: Tensor, scaling: float, meta: LoraBatchMeta) -> Tensor:
    """Two launches forward (shrink, expand), four backward; differentiable in x, a3 and b3. One custom op under
    torch.compile (its graph stays whole), an autograd.Function in eager training."""
    if not HAS_TRITON:
        raise RuntimeError("grouped_lora_triton needs triton, which is not installed; use grouped_lora_reference.")
    check_grouped_lora_args(x, a3, b3, meta)
    m = meta
    return _OP(x, a3, b3, float(scaling), m.token_slots, m.sorted_tokens, m.slot_starts, m.slot_counts,
               m.tile_slots, m.tile_rows, m.n_slots, m.block_m, needs_grad=needs_grad(x, a3, b3))


def grouped_lora(x: Tensor, a3: Tensor, b3: Tensor, scaling: float, meta: LoraBatchMeta, *,
                 rows_sorted: bool = False) -> Tensor:
    """s · x_e · A_eᵀ · B_eᵀ for the rows of each expert e ([N, out], the adapter's dtype); see the module doc.
    `rows_sorted`: the rows are already grouped by expert in order (what torch's grouped matmul needs)."""
    if use_triton(x, a3, b3, meta.sorted_tokens):
        return grouped_lora_triton(x, a3, b3, scaling, meta)
    if rows_sorted and _grouped_mm_ok(a3, b3) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return grouped_lora_torch(x, a3, b3, scaling, meta)
    return grouped_lora_reference(x, a3, b3, scaling, meta)

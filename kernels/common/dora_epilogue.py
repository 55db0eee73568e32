"""DoRA's two elementwise epilogues, shared by the DoRA ops (dora_linear.py, dora_dropout_linear.py): the LoRA
expand that applies the magnitude scale c (and a bias, or a residual) while the output tile is in registers, and
the backward pass that writes dt = c ⊙ dy while summing the magnitude's gradient Σ_tokens dy ⊙ (y - b)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import HAS_TRITON
from .dot_policy import dot_mode, precision
from .tiling import cdiv, hi_lo, np2
from .launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .jit import acc_zeros, dot_operands

    @triton.jit
    def _dora_expand_kernel(
        z_ptr, b_ptr, base_ptr, y_ptr, c_ptr, bias_ptr,
        M, N, R, s_hi, s_lo,
        stride_zm, stride_zr, stride_bn, stride_br, stride_basem, stride_basen, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, RESID: tl.constexpr,
    ):
        # RESID: y holds a residual r on entry and gets r + c ⊙ (base + s·z·Bᵀ) - base (DoRA with dropout).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = rm < M
        mask_n = rn < N
        acc = acc_zeros(BLOCK_M, BLOCK_N, DOT)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < R
            a = tl.load(z_ptr + rm[:, None] * stride_zm + rr[None, :] * stride_zr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            # The dtype policy of every LoRA matmul (dot_policy.py): 16-bit outputs meet on the tensor cores
            a, b = dot_operands(a, b, DOT)
            acc += tl.dot(a, b, input_precision=PRECISION)
        s = tl.zeros((BLOCK_N,), dtype=acc.dtype) + s_hi
        if DOT == 2:  # float arguments arrive as fp32: hi + lo, added in float64, keeps the scaling exact
            s = s + s_lo
        mask = mask_m[:, None] & mask_n[None, :]
        base = tl.load(base_ptr + rm[:, None] * stride_basem + rn[None, :] * stride_basen, mask=mask,
                       other=0.0).to(acc.dtype)
        c = tl.load(c_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)
        out = c[None, :] * (base + s[None, :] * acc)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
        if RESID:
            out += tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=mask,
                           other=0.0).to(acc.dtype) - base
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, out.to(y_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _dora_bwd_kernel(
        dy_ptr, y_ptr, c_ptr, bias_ptr, dt_ptr, colsum_ptr,
        M, N, stride_dym, stride_dyn, stride_ym, stride_yn, stride_dtm, stride_dtn,
        HAS_BIAS: tl.constexpr, F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        mask = (rm < M)[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=mask, other=0.0)
        y = tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=mask, other=0.0)
        if F64:
            dyf = dy.to(tl.float64)
            yf = y.to(tl.float64)
        else:
            dyf = dy.to(tl.float32)
            yf = y.to(tl.float32)
        c = tl.load(c_ptr + rn, mask=mask_n, other=0.0).to(dyf.dtype)
        if HAS_BIAS:
            yf -= tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(dyf.dtype)[None, :]
        tl.store(dt_ptr + rm[:, None] * stride_dtm + rn[None, :] * stride_dtn,
                 (c[None, :] * dyf).to(dt_ptr.dtype.element_ty), mask=mask)
        tl.atomic_add(colsum_ptr + rn, tl.sum(tl.where(mask, dyf * yf, 0.0), axis=0), mask=mask_n)


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-channel vector as the kernels read it: contiguous (a no-op for the layers' own)."""
    return t.contiguous() if t is not None else None


def dora_expand(z: Tensor, lora_b: Tensor, base2d: Tensor, y2d: Tensor, c: Tensor, bias: Optional[Tensor],
            scaling: float, resid: bool = False) -> None:
    M, R = z.shape
    N = lora_b.shape[0]
    if M == 0 or N == 0:
        return
    dot = dot_mode(z.dtype, lora_b.dtype, y2d.dtype)
    c, bias = _vector(c), _vector(bias)
    bm, bn = min(64, max(16, np2(M))), min(64, max(16, np2(N)))
    br = min(64, max(16, np2(R)))
    s_hi, s_lo = hi_lo(float(scaling))  # kernel arguments, not a tensor: no host-to-device copy per call
    grid = (cdiv(N, bn), cdiv(M, bm))
    launch(_dora_expand_kernel, grid,
        z, lora_b, base2d, y2d, c, bias if bias is not None else c, M, N, R, s_hi, s_lo,
        z.stride(0), z.stride(1), lora_b.stride(0), lora_b.stride(1), base2d.stride(0), base2d.stride(1),
        y2d.stride(0), y2d.stride(1),
        HAS_BIAS=bias is not None, DOT=dot, PRECISION=precision(dot), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
        RESID=resid,
    )


def dora_scale_grad(dy2d: Tensor, y2d: Tensor, mag_scale: Tensor, bias: Optional[Tensor], dt: Tensor,
                colsum: Tensor) -> None:
    """dt = c ⊙ dy, colsum += Σ_rows dy ⊙ (y - b), for one block of rows."""
    M, N = dy2d.shape
    if M == 0 or N == 0:
        return
    if torch.are_deterministic_algorithms_enabled():  # the kernel's atomics reorder the column sums: torch instead
        acc = colsum.dtype
        t = y2d.to(acc) - bias.to(acc) if bias is not None else y2d.to(acc)
        colsum += torch.einsum("ij,ij->j", dy2d.to(acc), t)
        dt.copy_(mag_scale.to(acc) * dy2d.to(acc))
        return
    mag_scale, bias = _vector(mag_scale), _vector(bias)
    bm, bn = min(64, max(16, np2(M))), min(64, max(16, np2(N)))
    launch(_dora_bwd_kernel, (cdiv(N, bn), cdiv(M, bm)),
        dy2d, y2d, mag_scale, bias if bias is not None else mag_scale, dt, colsum,
        M, N, dy2d.stride(0), dy2d.stride(1), y2d.stride(0), y2d.stride(1), dt.stride(0), dt.stride(1),
        HAS_BIAS=bias is not None, F64=colsum.dtype == torch.float64, BLOCK_M=bm, BLOCK_N=bn,
    )

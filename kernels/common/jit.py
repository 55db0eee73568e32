"""Triton device functions shared by the kernels."""
from __future__ import annotations

from .backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def dot_operands(a, b, DOT: tl.constexpr):
        """Cast both operands of a tl.dot to the dtype dot_policy chose (DOT_NATIVE keeps them as they are)."""
        if DOT == 1:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if DOT == 2:
            a = a.to(tl.float64)
            b = b.to(tl.float64)
        if DOT == 3:
            a = a.to(tl.bfloat16)
            b = b.to(tl.bfloat16)
        if DOT == 4:
            a = a.to(tl.float16)
            b = b.to(tl.float16)
        return a, b

    @triton.jit
    def acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        """A zero accumulator: float64 for float64 dots, float32 otherwise."""
        if DOT == 2:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        return acc

    @triton.jit
    def rows_times_a(x_ptr, a_ptr, rows, rr, mask_m, mask_r, K, stride_xm, stride_xk, stride_ak, stride_ar,
                     DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """z [BLOCK_M, BLOCK_R] = x[rows, :] · a[:, rr] over the whole K: the LoRA shrink of a few rows, kept in
        registers by the one-launch kernels (decode, mixed-batch decode)."""
        z = acc_zeros(BLOCK_M, BLOCK_R, DOT)
        for k0 in range(0, K, BLOCK_K):
            rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            xa = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            aa = tl.load(a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            xa, aa = dot_operands(xa, aa, DOT)
            z += tl.dot(xa, aa, input_precision=PRECISION)
        return z

    @triton.jit
    def to_bf16_rne(x):
        """float32 -> bfloat16, round to nearest even, by bits (finite x): the interpreter's cast truncates."""
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def slot_epilogue(acc, slot, tok, rn, mask_m, mask_n, y_ptr, bias_ptr, scal_ptr, dscale_ptr, bbias_ptr,
                      stride_ym, stride_yn, stride_biass, stride_biasn, stride_dss, stride_dsn,
                      HAS_BIAS: tl.constexpr, HAS_DORA: tl.constexpr, HAS_BBIAS: tl.constexpr):
        """The multi-adapter expand's end, shared by its kernels: the slot's bias and scaling on the delta `acc`
        of token rows `tok`, added into y in place (DoRA slots: y + (c - 1)·(y - base bias) + c·delta)."""
        if HAS_BIAS:
            bias = tl.load(bias_ptr + slot.to(tl.int64) * stride_biass + rn * stride_biasn, mask=mask_n, other=0.0)
            acc += bias.to(acc.dtype)[None, :]
        # A tensor, not a kernel argument: float arguments would arrive as fp32 and break float64 exactness.
        acc = acc * tl.load(scal_ptr + slot).to(acc.dtype)
        y_ptrs = y_ptr + tok[:, None] * stride_ym + rn[None, :] * stride_yn
        mask_y = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptrs, mask=mask_y, other=0.0).to(acc.dtype)
        if HAS_DORA:
            c = tl.load(dscale_ptr + slot.to(tl.int64) * stride_dss + rn * stride_dsn, mask=mask_n,
                        other=1.0).to(acc.dtype)[None, :]
            if HAS_BBIAS:
                base = y - tl.load(bbias_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
            else:
                base = y
            out = y + (c - 1.0) * base + c * acc
        else:
            out = y + acc
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_y)

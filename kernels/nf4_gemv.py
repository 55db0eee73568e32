"""NF4 GEMV: y = x·dequant(Wq)ᵀ (+ b) for a handful of rows of x, reading each packed byte once per row.

The plain 2-D alternative to qlora_gemv's 3-D tiling, kept beside it so that a GPU run can time both against
dequantize-then-cuBLAS (bench/test_bench_qlora_paths.py) before either becomes the decode path. One program per
(BLOCK_N weight rows, row of x) walks K in steps of BLOCK_KB bytes: a [BLOCK_N, BLOCK_KB] byte tile (coalesced
along K), its high nibbles times x's even elements and its low nibbles times the odd ones (no interleave, no
reshape), each scaled by its block's absmax, accumulated in float32 and reduced once at the end.
Same contract as nf4_linear (output in x's dtype; the weight in float32 code·absmax, not rounded to x's dtype).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import HAS_TRITON, use_triton
from .lora_linear import _np2, _num_sms
from .nf4 import NF4State, decode_absmax, launch_args
from .nf4_linear import _check_args, nf4_linear_reference

__all__ = ["nf4_gemv", "nf4_gemv_reference", "nf4_gemv_triton"]


def nf4_gemv_reference(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    return nf4_linear_reference(x, packed, state, bias)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_gemv_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, bias_ptr, y_ptr, N, K, stride_xm, stride_xk, stride_ym,
                         BS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        ldq = K // 2
        q_rows = q_ptr + rn.to(tl.int64)[:, None] * ldq
        a_rows = absmax_ptr + rn.to(tl.int64)[:, None] * (K // BS)
        acc = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
        for kb in range(0, ldq, BLOCK_KB):
            cols = kb + tl.arange(0, BLOCK_KB)
            mask_k = cols < ldq
            mask = mask_n[:, None] & mask_k[None, :]
            byte = tl.load(q_rows + cols[None, :], mask=mask, other=0).to(tl.int32)
            hi = tl.load(code_ptr + (byte >> 4))
            lo = tl.load(code_ptr + (byte & 15))
            xe = tl.load(x_ptr + m * stride_xm + (2 * cols) * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + m * stride_xm + (2 * cols + 1) * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            scale = tl.load(a_rows + (2 * cols[None, :]) // BS, mask=mask, other=0.0)
            acc += (hi * xe[None, :] + lo * xo[None, :]) * scale
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def nf4_gemv_triton(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    _check_args(x, packed, state)
    if not HAS_TRITON:
        raise RuntimeError("nf4_gemv_triton needs triton, which is not installed; use nf4_gemv_reference.")
    N, K = state.shape
    if K % state.blocksize:
        raise ValueError(f"nf4_gemv_triton: in_features ({K}) must be a multiple of the 4-bit blocksize "
                         f"({state.blocksize}); nf4_linear handles any layout.")
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    flat, absmax, code, nested = launch_args(packed, state, x.device)
    absmax = decode_absmax(absmax, nested)
    # ~4 programs per SM when N allows: rows of 4-8 bytes-wide tiles of 256 bytes keep 16-byte loads per thread.
    bn = 8
    while bn > 1 and triton.cdiv(N, bn) * M < 4 * _num_sms(x.device):
        bn //= 2
    bkb = min(256, _np2(K // 2))
    grid = (triton.cdiv(N, bn), M)
    _nf4_gemv_kernel[grid](x2d, flat, absmax, code, bias.to(x.dtype) if bias is not None else y, y, N, K,
                           x2d.stride(0), x2d.stride(1), y.stride(0), BS=state.blocksize, HAS_BIAS=bias is not None,
                           BLOCK_N=bn, BLOCK_KB=bkb)
    return y.view(*x.shape[:-1], N)


def nf4_gemv(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    """x·dequant(Wq)ᵀ + b for decode-size x, inference only, in x's dtype."""
    if use_triton(x, packed):
        return nf4_gemv_triton(x, packed, state, bias)
    return nf4_gemv_reference(x, packed, state, bias)

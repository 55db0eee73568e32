"""The LoRA delta of a few rows in one launch (inference at decode): y (+)= s·((x·Aᵀ)·Bᵀ (+ b_B)).

The two-launch path (lora_mm.mm twice) writes z = x·Aᵀ to memory and launches again for the expand. At decode the
rows are few, so each program recomputes the rows' whole z in registers for its out tile: one launch, no z. The
dots meet in the dtypes the two launches would use (z accumulates as the two-launch path's float32 z)."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import settings
from .backend import HAS_TRITON
from .dot_policy import dot_mode, precision
from .launch import launch
from .tiling import cdiv, hi_lo, np2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .jit import acc_zeros, dot_operands, rows_times_a
    @triton.jit
    def _lora_decode_kernel(x_ptr, a_ptr, b_ptr, y_ptr, bias_ptr, c_ptr, M, N, K, R,
                            stride_xm, stride_xk, stride_ak, stride_ar, stride_br, stride_bn, stride_ym, stride_yn,
                            scale_hi, scale_lo,
                            ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, DORA: tl.constexpr,
                            DOT_A: tl.constexpr, DOT_B: tl.constexpr, PREC_A: tl.constexpr, PREC_B: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        # y[rows, out tile] (+)= s·((x·a)·b (+ bias)) for a few rows: each program computes the rows' whole
        # z = x·a [BLOCK_M, R] in registers, then its out tile of z·b. No z in memory, one launch. DORA: y holds
        # the base output and becomes c ⊙ (y + s·(x·a)·b) + bias (dora_epilogue's expand).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        mask_m, mask_n, mask_r = rm < M, rn < N, rr < R
        z = rows_times_a(x_ptr, a_ptr, rm, rr, mask_m, mask_r, K, stride_xm, stride_xk, stride_ak, stride_ar,
                         DOT_A, PREC_A, BLOCK_M, BLOCK_R, BLOCK_K)
        bb = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        z, bb = dot_operands(z, bb, DOT_B)
        acc = acc_zeros(BLOCK_M, BLOCK_N, DOT_B)
        acc += tl.dot(z, bb, input_precision=PREC_B)
        if HAS_BIAS and not DORA:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
        out = acc * scale_hi
        if DOT_B == 2:
            out += acc * scale_lo
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
        mask_y = mask_m[:, None] & mask_n[None, :]
        if ACCUMULATE:
            out += tl.load(y_ptrs, mask=mask_y, other=0.0).to(out.dtype)
        if DORA:
            out = tl.load(c_ptr + rn, mask=mask_n, other=0.0).to(out.dtype)[None, :] * out
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(out.dtype)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_y)


# At most this many rows (decode) and this rank, the LoRA delta of an inference call runs as one launch
# (`mm_decode`): recomputing the rows' z per out tile costs less than writing it and launching again, as long as
# the A each program re-reads stays small. Every out tile streams all of A (from L2 after the first): at 256 KiB
# (rank 16 over 4096 features in fp32) a 64-tile layer moves 16 MiB through L2, about what the second launch's
# latency costs; larger adapters take the two launches, whose shrink splits K. The crossover is for gpu_check's
# decode benchmarks to confirm.
DECODE_MAX_ROWS, DECODE_MAX_RANK, DECODE_MAX_A_BYTES = 16, 128, 256 << 10


class DecodeConfig(NamedTuple):
    grid: tuple[int, int]
    dot_a: int
    dot_b: int
    prec_a: str
    prec_b: str
    block_m: int
    block_n: int
    block_r: int
    block_k: int


@functools.lru_cache(maxsize=1024)
def decode_config(M: int, N: int, K: int, R: int, x_dtype: torch.dtype, a_dtype: torch.dtype, b_dtype: torch.dtype,
                  y_dtype: torch.dtype, z_type: torch.dtype, matmul_precision: str,
                  switches: settings.Settings) -> DecodeConfig:
    """The launch of one `mm_decode` shape; the last two arguments are the global state it depends on."""
    dot_a, dot_b = dot_mode(x_dtype, a_dtype, z_type), dot_mode(z_type, b_dtype, y_dtype)
    bm, bn, br = max(16, np2(M)), min(64, max(16, np2(N))), max(16, np2(R))
    bk = min(64 if br <= 64 else 32, max(16, np2(K)))
    return DecodeConfig((cdiv(N, bn), cdiv(M, bm)), dot_a, dot_b, precision(dot_a), precision(dot_b), bm, bn, br, bk)


def decodes(x: Tensor, lora_a: Tensor, dropout_p: float, grad: bool) -> bool:
    """Whether an eager LoRA call takes the one-launch path: inference, no dropout, few rows, a small adapter.
    (Under torch.compile the ops stay custom ops with their two launches.)"""
    in_f, r = x.shape[-1], lora_a.shape[0]
    return (not grad and dropout_p == 0 and in_f > 0 and x.numel() // in_f <= DECODE_MAX_ROWS
            and r <= DECODE_MAX_RANK and r * in_f * lora_a.element_size() <= DECODE_MAX_A_BYTES
            and not torch.compiler.is_compiling())


def mm_decode(x: Tensor, a: Tensor, b: Tensor, y: Tensor, z_type: torch.dtype, *, scale: float,
              accumulate: bool, bias: Optional[Tensor] = None, dora_scale: Optional[Tensor] = None) -> None:
    """y[M,N] (+)= scale·((x[M,K] @ a[K,R]) @ b[R,N] (+ bias[N])), any strides, in one launch: for M <=
    DECODE_MAX_ROWS and R <= DECODE_MAX_RANK. z = x @ a stays in registers, accumulated as a z_type tensor would
    be (the two-launch path's z), so the dots' dtypes are the two launches' ones. With `dora_scale` c [N], y holds
    the base output x·Wᵀ and becomes DoRA's c ⊙ (y + scale·(x @ a) @ b) + bias (bias: the base layer's)."""
    M, K = x.shape
    R, N = b.shape
    if M == 0 or N == 0:
        return
    cfg = decode_config(M, N, K, R, x.dtype, a.dtype, b.dtype, y.dtype, z_type, torch.get_float32_matmul_precision(),
                        settings.current())
    s_hi, s_lo = hi_lo(float(scale))
    if dora_scale is not None and not accumulate:
        raise ValueError("mm_decode: DoRA's epilogue reads the base output from y: pass accumulate=True")
    # the kernel reads the vectors as contiguous
    bias = bias.contiguous() if bias is not None else None
    dora_scale = dora_scale.contiguous() if dora_scale is not None else None
    launch(_lora_decode_kernel, cfg.grid, x, a, b, y, bias if bias is not None else y,
           dora_scale if dora_scale is not None else y, M, N, K, R,
           x.stride(0), x.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), y.stride(0), y.stride(1),
           s_hi, s_lo, ACCUMULATE=accumulate, HAS_BIAS=bias is not None, DORA=dora_scale is not None,
           DOT_A=cfg.dot_a, DOT_B=cfg.dot_b,
           PREC_A=cfg.prec_a, PREC_B=cfg.prec_b, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
           BLOCK_K=cfg.block_k)

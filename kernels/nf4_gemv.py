"""NF4 GEMV for decode: y = x·dequant(Wq)ᵀ (+ b) for a few rows of x, reading the packed 4-bit weight once.

Dequantize-then-cuBLAS (nf4_linear.py's `nf4_matmul`) writes and re-reads a transient 16-bit copy of the weight:
four times the bytes of the codes, which is what decode time is made of. Here each program streams BLOCK_N rows
of codes, decodes them in registers (the 16-entry codebook and the absmax, double-quantized or not, as bnb), rounds
them to x's dtype as the dequantized weight would be, and multiplies with x in one tl.dot: the numbers are the
dequantize-then-matmul path's up to the matmul's summation order. No split of K: BLOCK_N = 16 gives thousands of
programs for a Llama-sized layer, enough to keep the memory system busy.

nf4_linear's `nf4_matmul` (the base matmul of NF4Linear and of the fused QLoRA op) runs it for up to GEMV_MAX_ROWS
rows when the nf4_decode setting is "gemv" (PEFT_FAST_NF4_DECODE); the default, "dequant", keeps
dequantize-then-cuBLAS until bench/test_bench_qlora_linear.py on a GPU shows where each is faster.
The reference is bitsandbytes' Linear4bit forward, written out (as nf4_linear's).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.autograd import OpaqueOp
from .common.backend import HAS_TRITON, use_triton
from .common.dot_policy import DOT_F64, dot_mode, precision
from .common.nf4_format import NF4State, check_nf4_args, launch_args
from .common.tiling import cdiv, np2
from .nf4_dequantize import nf4_dequantize_reference
from .common.launch import launch

__all__ = ["nf4_gemv", "nf4_gemv_reference", "nf4_gemv_triton", "gemv_raw", "GEMV_MAX_ROWS"]

GEMV_MAX_ROWS = 16  # one tl.dot tile of x rows


def _check(x: Tensor, packed: Tensor, state: NF4State) -> None:
    check_nf4_args(packed, state)
    if len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        raise ValueError(f"nf4_gemv: x has {x.shape[-1]} features, the 4-bit weight {tuple(state.shape)} must be 2-D "
                         f"[out, {x.shape[-1]}]")


def nf4_gemv_reference(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    """bitsandbytes' Linear4bit forward written out (as nf4_linear_reference): dequantize in float32, cast to x's
    dtype, F.linear."""
    _check(x, packed, state)
    w = nf4_dequantize_reference(packed, dataclasses.replace(state, dtype=torch.float32)).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common.jit import acc_zeros, dot_operands

    @triton.jit
    def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, bias_ptr, y_ptr,
                         M, N, K, stride_xm, stride_xk, stride_ym, stride_yn,
                         BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        rm = tl.arange(0, BLOCK_M)
        mask_m = rm < M
        acc = acc_zeros(BLOCK_M, BLOCK_N, DOT)
        for k0 in range(0, K, BLOCK_K):
            rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            mask_w = mask_n[:, None] & mask_k[None, :]
            # Element e of the flattened [N, K] weight: its byte e // 2 (high nibble first), its block e // BLOCKSIZE
            # (blocks may span rows, as in bitsandbytes).
            e = rn[:, None] * K + rk[None, :]
            b = tl.load(packed_ptr + e // 2, mask=mask_w, other=0).to(tl.int32)
            q = tl.where(e % 2 == 0, b >> 4, b & 15)
            w = tl.load(code_ptr + q, mask=mask_w, other=0.0)
            blk = e // BLOCKSIZE
            if NESTED:
                qa = tl.load(absmax_ptr + blk, mask=mask_w, other=0).to(tl.int32)
                scale = tl.load(ncode_ptr + qa, mask=mask_w, other=0.0) * tl.load(nabs_ptr + blk // NESTED_BS,
                                                                                   mask=mask_w, other=0.0)
                scale = scale + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + blk, mask=mask_w, other=0.0)
            # The dequantized weight in x's dtype, as dequantize-then-matmul hands it to cuBLAS.
            w = (w * scale).to(x_ptr.dtype.element_ty)
            xa = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if DOT == 2:
                # triton 3.6 cannot lower an fp64 dot whose operand was built in registers ("fp64 don't support
                # largeK MMA"); float64 is for tests: an explicit reduction over a small block does.
                acc += tl.sum(xa.to(tl.float64)[:, None, :] * w.to(tl.float64)[None, :, :], axis=2)
            else:
                xa, wt = dot_operands(xa, tl.trans(w), DOT)
                acc += tl.dot(xa, wt, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def _gemv(x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nabs: Optional[Tensor], ncode: Optional[Tensor],
          offset: Optional[Tensor], nbs: int, out_f: int, blocksize: int, bias: Optional[Tensor]) -> Tensor:
    M, K = x2d.shape
    y = torch.empty((M, out_f), device=x2d.device, dtype=x2d.dtype)
    if M == 0 or out_f == 0:
        return y
    dot = dot_mode(x2d.dtype, x2d.dtype, x2d.dtype)
    nested = nabs is not None
    if not nested:
        nabs, ncode, offset, nbs = absmax, code, absmax, 1
    # float64 (tests) reduces a [BLOCK_M, BLOCK_N, BLOCK_K] product in registers: keep that block small.
    BLOCK_N, BLOCK_K = 16, min(32 if dot == DOT_F64 else 256, max(16, np2(K)))
    launch(_nf4_gemv_kernel, (cdiv(out_f, BLOCK_N),),
        x2d, packed, absmax, code, nabs, ncode, offset, bias if bias is not None else y, y,
        M, out_f, K, x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BS=nbs, HAS_BIAS=bias is not None,
        DOT=dot, PRECISION=precision(dot), BLOCK_M=GEMV_MAX_ROWS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return y


def _gemv_fake(x2d, packed, absmax, code, nabs, ncode, offset, nbs, out_f, blocksize, bias):
    return x2d.new_empty((x2d.shape[0], out_f))


_GEMV = OpaqueOp("nf4_gemv_raw", _gemv, _gemv_fake)


def gemv_raw(x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested: Optional[tuple], out_f: int,
             blocksize: int, bias: Optional[Tensor] = None) -> Tensor:
    """x2d [M <= GEMV_MAX_ROWS, in] @ dequant(Wq)ᵀ (+ bias) in x's dtype, from `launch_args`' tensors."""
    nabs, ncode, offset, nbs = nested if nested is not None else (None, None, None, 1)
    return _GEMV(x2d, packed, absmax, code, nabs, ncode, offset, int(nbs), int(out_f), int(blocksize), bias)


def nf4_gemv_triton(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    """One launch. Forward only: nf4_linear wraps it where gradients flow (its backward dequantizes)."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_gemv_triton needs triton, which is not installed; use nf4_gemv_reference.")
    _check(x, packed, state)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"nf4_gemv: at most {GEMV_MAX_ROWS} rows (decode), got {x2d.shape[0]}; use nf4_linear")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("nf4_gemv has no backward: use nf4_linear where gradients are needed (it runs this "
                           "kernel in its forward under PEFT_FAST_NF4_DECODE=gemv)")
    flat, absmax, code, nested = launch_args(packed, state, x.device)
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    y = gemv_raw(x2d, flat, absmax, code, nested, state.shape[0], state.blocksize, b)
    return y.view(*x.shape[:-1], state.shape[0])


def nf4_gemv(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    if use_triton(x, packed):
        return nf4_gemv_triton(x, packed, state, bias)
    return nf4_gemv_reference(x, packed, state, bias)

"""QLoRA linear: y = x·dequant(Wq)ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B), Wq a 4-bit NF4/FP4 weight in bnb's layout.

The reference is Hugging Face PEFT's `lora.bnb.Linear4bit.forward` over bitsandbytes' `Linear4bit` on CPU, written
out: the weight is dequantized (code·absmax in float32) and cast to x's dtype, `F.linear` runs in x's dtype; the
LoRA delta runs in the adapter dtype, is cast to the base output's dtype, then added (PEFT's bnb order, which
differs from its dense `lora.Linear`, where the sum is cast: PEFT picks this layer for 4-bit models).

The Triton path never writes the dequantized weight: `_nf4_mm_kernel` loads the packed bytes of a weight tile,
splits the nibbles (high nibble = even element), gathers the 16-entry codebook, scales by the block's absmax and
feeds the tile to tl.dot with float32 accumulation. The same kernel runs transposed for dx = dy·dequant(Wq), so
backward materialises no weight either. A K tile (BLOCK_K ≤ 64) divides the NF4 blocksize, so one absmax per
weight row covers a tile. Double-quantized absmax is decoded to float32 in torch before the launch (n/blocksize
floats, as nf4.py does). The LoRA matmuls reuse lora_linear's `_mm` kernel (dropout regenerated from a seed).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import HAS_TRITON, use_triton
from .dot_policy import dot_mode, precision
from .lora_linear import _DROP_A, _DROP_NONE, _mm, _np2, _z_dtype, eager_autograd, lora_backward
from .nf4 import NF4State, decode_absmax, dequantize_raw, launch_args, nf4_dequantize_reference
from .nf4_linear import _check_args as _check_nf4_linear_args

__all__ = ["qlora_linear", "qlora_linear_reference", "qlora_linear_triton"]


def _check_args(x: Tensor, packed: Tensor, state: NF4State, dropout_p: float) -> None:
    _check_nf4_linear_args(x, packed, state, op="qlora_linear")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"qlora_linear: dropout_p must be in [0, 1], got {dropout_p}")


def qlora_linear_reference(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0,
                           lora_bias=None):
    """PEFT's LoRA over bitsandbytes' Linear4bit (CPU path): the definition of correct. Backward is autograd."""
    _check_args(x, packed, state, dropout_p)
    # bnb: dequantize_4bit(..., dtype=A.dtype) then F.linear(A, W, bias) in the compute (= x's) dtype.
    w = nf4_dequantize_reference(packed, dataclasses.replace(state, dtype=torch.float32)).to(x.dtype)
    result = F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    xa = x.to(lora_a.dtype)  # PEFT's _cast_input_dtype
    if dropout_p > 0:
        xa = F.dropout(xa, dropout_p, training=True)
    delta = F.linear(F.linear(xa, lora_a), lora_b, lora_bias) * scaling
    return result + delta.to(result.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel: C = A @ dequant(Wq)ᵀ (TRANS=False: A [M,K] -> C [M,N], + bias) or C = A @ dequant(Wq) (TRANS=True:
# A [M,N] -> C [M,K]). Wq is [N,K] packed row-major, two codes per byte; absmax [N·K/BS] float32.
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_mm_kernel(
        a_ptr, q_ptr, absmax_ptr, code_ptr, bias_ptr, c_ptr,
        M, N, K,
        stride_am, stride_ak, stride_cm, stride_cn,
        TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, BS: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if TRANS:
            num_j = tl.cdiv(K, BLOCK_K)
            steps = tl.cdiv(N, BLOCK_N)
        else:
            num_j = tl.cdiv(N, BLOCK_N)
            steps = tl.cdiv(K, BLOCK_K)
        pid_m = pid // num_j
        pid_j = pid % num_j
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rm < M
        half = tl.arange(0, BLOCK_K // 2)
        ldq = K // 2           # bytes per weight row (K is a multiple of BS, hence even)
        ldabs = K // BS        # absmax blocks per weight row
        if DOT == 2:
            acc = tl.zeros((BLOCK_M, BLOCK_K if TRANS else BLOCK_N), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_K if TRANS else BLOCK_N), dtype=tl.float32)
        for t in range(0, steps):
            if TRANS:  # reduce over N; this program's output columns are a K tile
                rn = (t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
                k0 = pid_j * BLOCK_K
            else:      # reduce over K; this program's output columns are an N tile
                rn = (pid_j * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
                k0 = t * BLOCK_K
            rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_n = rn < N
            mask_k = rk < K
            # The weight tile [BLOCK_N, BLOCK_K], dequantized in registers: byte j holds elements 2j (high nibble)
            # and 2j+1 (low); BLOCK_K divides BS, so the tile's row n shares absmax[n·K/BS + k0/BS].
            byte = tl.load(q_ptr + rn[:, None] * ldq + (k0 // 2 + half)[None, :],
                           mask=mask_n[:, None] & ((k0 // 2 + half) < ldq)[None, :], other=0).to(tl.int32)
            hi = tl.load(code_ptr + (byte >> 4))
            lo = tl.load(code_ptr + (byte & 15))
            vals = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
            scale = tl.load(absmax_ptr + rn * ldabs + k0 // BS, mask=mask_n, other=0.0)
            w = vals * scale[:, None]  # float32, exactly bnb's code[q] * absmax
            if TRANS:
                a = tl.load(a_ptr + rm[:, None] * stride_am + rn[None, :] * stride_ak,
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            else:
                a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if DOT == 1:
                a = a.to(tl.float32)
            elif DOT == 2:
                a = a.to(tl.float64)
                w = w.to(tl.float64)
            else:  # native 16-bit (or float32) operands: the weight in x's dtype, as bnb dequantizes it
                w = w.to(a.dtype)
            if TRANS:
                acc += tl.dot(a, w, input_precision=PRECISION)
            else:
                acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
        if TRANS:
            rj = (pid_j * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_j = rj < K
        else:
            rj = (pid_j * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_j = rj < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rj, mask=mask_j, other=0.0).to(acc.dtype)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rj[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_j[None, :])


def _nf4_mm(a: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_f: int, blocksize: int, *,
            trans: bool, bias: Optional[Tensor] = None) -> Tensor:
    """a [M,K] @ dequant(Wq)ᵀ (+ bias) -> [M,N]; trans: a [M,N] @ dequant(Wq) -> [M,K]. Output in a's dtype."""
    M = a.shape[0]
    K = a.shape[1] if not trans else packed.numel() * 2 // out_f
    N = out_f
    c = torch.empty((M, K if trans else N), device=a.device, dtype=a.dtype)
    if M == 0 or c.numel() == 0:
        return c
    dot = dot_mode(a.dtype, a.dtype, a.dtype)
    bk = min(64, blocksize)  # divides every bnb blocksize (powers of two >= 32): one absmax per row per tile
    bm = min(64, max(16, _np2(M)))
    bn = min(64, max(16, _np2(N)))
    grid = (triton.cdiv(M, bm) * (triton.cdiv(K, bk) if trans else triton.cdiv(N, bn)),)
    _nf4_mm_kernel[grid](
        a, packed, absmax, code, bias if bias is not None else c, c,
        M, N, K, a.stride(0), a.stride(1), c.stride(0), c.stride(1),
        TRANS=trans, HAS_BIAS=bias is not None, BS=blocksize, DOT=dot, PRECISION=precision(dot),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return c


# Which kernel runs the base matmul (bench/test_bench_qlora_paths.py measures all three per shape; gpu_check.sh):
# - "dequant": one Triton launch writes the 16-bit weight (freed at once), then cuBLAS. On an H200 (2026-11-26,
#   bench/results/) it won at every size measured, 1 to 4096 rows, forward and dx: e.g. 4096x14336 at 4096 rows
#   1.0 ms vs 40 ms for the fused GEMM, and 0.10 ms vs 0.26 ms at one row.
# - "fused": the weight dequantized inside the K loop of a Triton GEMM (no 16-bit copy; 25-60x slower than cuBLAS
#   as it stands: per-element codebook gathers on the critical path and no software pipelining).
# - "gemv": qlora_gemv for inference at decode sizes (2.6-11x slower than the dequant path in that run).
# The fused kernels stay tested and selectable (PEFT_FAST_QLORA_BASE=fused|dequant|gemv) for the work that would
# make them win; until a run shows them winning at some size, auto picks "dequant" everywhere.
DEQUANT_MIN_ROWS = 1
GEMV_MAX_ROWS = 0


def _base_path(rows: int) -> str:
    """"fused", "dequant" or (inference only) "gemv"; PEFT_FAST_QLORA_BASE=fused|dequant|gemv forces one."""
    forced = os.environ.get("PEFT_FAST_QLORA_BASE", "auto")
    if forced in ("fused", "dequant", "gemv"):
        return forced
    if rows <= GEMV_MAX_ROWS:
        return "gemv"
    return "dequant" if rows >= DEQUANT_MIN_ROWS else "fused"


def _nested(nabs, ncode, offset, nbs) -> Optional[tuple]:
    return None if nabs is None else (nabs, ncode, offset, nbs)


def _nf4_base_mm(a: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested: Optional[tuple], out_f: int,
                 blocksize: int, *, trans: bool, bias: Optional[Tensor] = None) -> Tensor:
    """`_nf4_mm`'s contract, by whichever of the two paths wins at this many rows. A weight whose quantization
    blocks span two rows (in_features not a multiple of the blocksize, which bitsandbytes allows) always takes the
    dequantize path: the fused K loop assumes one absmax per row per tile."""
    in_f = packed.numel() * 2 // out_f
    # float64 on CUDA: triton 3.6 cannot compile the fused tile's fp64 tl.dot (an operand built in registers: "fp64
    # don't support largeK MMA"; seen on an H200 and reproduced by compiling for sm_90 here). float64 exists for
    # tests, which then check the dequantize path there.
    fused_ok = in_f % blocksize == 0 and not (a.dtype == torch.float64 and a.is_cuda)
    if _base_path(a.shape[0]) in ("fused", "gemv") and fused_ok:
        return _nf4_mm(a, packed, decode_absmax(absmax, nested), code, out_f, blocksize, trans=trans, bias=bias)
    w = dequantize_raw(packed, absmax, code, (out_f, in_f), a.dtype, blocksize, nested)  # freed on return
    return a @ w if trans else F.linear(a, w, bias)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops. NF4State becomes tensors and ints: the packed bytes, the absmax as stored, the codebook, and for a
# double-quantized absmax its decoding tables (launch_args).
# ---------------------------------------------------------------------------------------------------------------
def _fwd_impl(x, packed, absmax, code, nabs, ncode, offset, nbs, bias, lora_a, lora_b, lora_bias, out_f, blocksize,
              scaling, dropout_p, seed):
    in_f, r = x.shape[-1], lora_a.shape[0]
    x2d = x.reshape(-1, in_f)
    M = x2d.shape[0]
    z = torch.empty((M, r), device=x.device, dtype=_z_dtype(x, lora_a, lora_b))
    _mm(x2d, lora_a.t(), z, drop=_DROP_A if dropout_p > 0 else _DROP_NONE, seed=seed, p=dropout_p,
        ld_x=in_f, rows_x=M)
    y = _nf4_base_mm(x2d, packed, absmax, code, _nested(nabs, ncode, offset, nbs), out_f, blocksize, trans=False,
                     bias=bias)
    _mm(z, lora_b.t(), y, scale=scaling, accumulate=True, bias=lora_bias)
    return y.view(*x.shape[:-1], out_f), z.view(*x.shape[:-1], r)


@torch.library.custom_op("peft_fast::qlora_linear_fwd", mutates_args=())
def _qlora_linear_fwd(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nabs: Optional[Tensor],
                      ncode: Optional[Tensor], offset: Optional[Tensor], nbs: int, bias: Optional[Tensor],
                      lora_a: Tensor, lora_b: Tensor, lora_bias: Optional[Tensor], out_f: int, blocksize: int,
                      scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _fwd_impl(x, packed, absmax, code, nabs, ncode, offset, nbs, bias, lora_a, lora_b, lora_bias, out_f,
                     blocksize, scaling, dropout_p, seed)


@_qlora_linear_fwd.register_fake
def _(x, packed, absmax, code, nabs, ncode, offset, nbs, bias, lora_a, lora_b, lora_bias, out_f, blocksize, scaling,
      dropout_p, seed):
    y = x.new_empty((*x.shape[:-1], out_f))
    z = x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=_z_dtype(x, lora_a, lora_b))
    return y, z


@torch.library.custom_op("peft_fast::qlora_linear_bwd", mutates_args=())
def _qlora_linear_bwd(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nabs: Optional[Tensor],
                      ncode: Optional[Tensor], offset: Optional[Tensor], nbs: int, lora_a: Tensor, lora_b: Tensor, z: Tensor, seed: Optional[Tensor], blocksize: int, scaling: float,
                      dropout_p: float, need_dx: bool, need_da: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); an unneeded gradient comes back empty (custom ops cannot return None)."""
    return _bwd_impl(dy, x, packed, absmax, code, nabs, ncode, offset, nbs, lora_a, lora_b, z, seed, blocksize,
                     scaling, dropout_p, need_dx, need_da, need_db)


def _bwd_impl(dy, x, packed, absmax, code, nabs, ncode, offset, nbs, lora_a, lora_b, z, seed, blocksize, scaling,
              dropout_p, need_dx, need_da, need_db):
    in_f, out_f = x.shape[-1], lora_b.shape[0]
    dy2d, x2d = dy.reshape(-1, out_f), x.reshape(-1, in_f)
    # dy·dequant(Wq): the forward kernel, transposed (no dequantized weight in memory); the LoRA part adds into it.
    dx2d = _nf4_base_mm(dy2d.to(x.dtype), packed, absmax, code, _nested(nabs, ncode, offset, nbs), out_f, blocksize,
                        trans=True) if need_dx else None
    da, db = lora_backward(dy2d, x2d, lora_a, lora_b, z.reshape(-1, lora_b.shape[1]), seed, scaling, dropout_p,
                           need_da, need_db, dx2d, accumulate=True)
    return (dx2d.view(x.shape) if need_dx else x.new_empty(0)), da, db


@_qlora_linear_bwd.register_fake
def _(dy, x, packed, absmax, code, nabs, ncode, offset, nbs, lora_a, lora_b, z, seed, blocksize, scaling, dropout_p, need_dx, need_da,
      need_db):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_da else lora_a.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_db else lora_b.new_empty(0)
    return dx, da, db


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, nabs, ncode, offset, nbs, bias, lora_a, lora_b, lora_bias, out_f, blocksize, scaling,
     dropout_p, seed) = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, packed, absmax, code, nabs, ncode, offset, lora_a, lora_b, z, seed)
    ctx.blocksize, ctx.scaling, ctx.dropout_p, ctx.nbs = blocksize, scaling, dropout_p, nbs
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.lora_bias_dtype = lora_bias.dtype if lora_bias is not None else None
    ctx.needs = tuple(t is not None and t.requires_grad for t in (x, bias, lora_a, lora_b, lora_bias))


def _backward(ctx, dy, _dz):
    x, packed, absmax, code, nabs, ncode, offset, lora_a, lora_b, z, seed = ctx.saved_tensors
    need_x, need_b, need_a, need_lb, need_lbias = ctx.needs
    dx = da = db = dbias = dlbias = None
    if need_x or need_a or need_lb:
        bwd = _bwd_impl if getattr(ctx, "eager", False) else _qlora_linear_bwd
        dx, da, db = bwd(dy, x, packed, absmax, code, nabs, ncode, offset, ctx.nbs, lora_a, lora_b, z, seed,
                         ctx.blocksize, ctx.scaling, ctx.dropout_p, need_x, need_a, need_lb)
    dy2d = dy.reshape(-1, dy.shape[-1])
    if need_b:
        dbias = dy2d.sum(0).to(ctx.bias_dtype)
    if need_lbias:
        dlbias = (dy2d.sum(0, dtype=ctx.lora_bias_dtype) * ctx.scaling).to(ctx.lora_bias_dtype)
    return (dx if need_x else None, None, None, None, None, None, None, None, dbias, da if need_a else None,
            db if need_lb else None, dlbias, None, None, None, None, None)


_qlora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


_EagerQLoraLinear = eager_autograd("_EagerQLoraLinear", _fwd_impl, _setup_context, _backward)


def qlora_linear_triton(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0,
                        lora_bias=None):
    """The base matmul fused with NF4 dequantization in `_nf4_mm_kernel`; every LoRA matmul in lora_linear's `_mm`."""
    _check_args(x, packed, state, dropout_p)
    if not HAS_TRITON:
        raise RuntimeError("qlora_linear_triton needs triton, which is not installed; use qlora_linear_reference.")
    out_f, in_f = state.shape
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"qlora_linear_triton: x must be a floating dtype, got {x.dtype}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside the custom op: cast x and the bias as it would, then run with it off.
        dtype = torch.get_autocast_dtype(device_type)
        x, bias = (t.to(dtype) if t is not None else t for t in (x, bias))
        with torch.autocast(device_type, enabled=False):
            return qlora_linear_triton(x, packed, state, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)
    inference = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_a, lora_b,
                                                                                   lora_bias)))
    if inference and dropout_p == 0 and in_f % state.blocksize == 0 and in_f and \
            _base_path(x.numel() // in_f) == "gemv":
        from .qlora_gemv import qlora_gemv_triton  # it imports this module

        return qlora_gemv_triton(x, packed, state, bias, lora_a, lora_b, scaling, lora_bias)
    # A double-quantized absmax stays uint8: the kernels decode it (no float32 copy, no extra launches).
    packed_flat, absmax, code, nested = launch_args(packed, state, x.device)
    nabs, ncode, offset, nbs = nested if nested is not None else (None, None, None, 0)
    bias = bias.to(x.dtype) if bias is not None else None  # bnb computes the bias in the compute dtype
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    args = (x, packed_flat, absmax, code, nabs, ncode, offset, nbs, bias, lora_a, lora_b, lora_bias, int(out_f),
            int(state.blocksize), float(scaling), float(dropout_p), seed)
    if inference:
        return _fwd_impl(*args)[0]  # eager inference: skip the custom-op dispatch
    if not torch.compiler.is_compiling():
        return _EagerQLoraLinear.apply(*args)[0]
    return _qlora_linear_fwd(*args)[0]


def qlora_linear(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0,
                 lora_bias=None):
    """x·dequant(Wq)ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B) over a bnb-layout 4-bit weight, in x's dtype."""
    if use_triton(x, packed, lora_a, lora_b):
        return qlora_linear_triton(x, packed, state, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)
    return qlora_linear_reference(x, packed, state, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)

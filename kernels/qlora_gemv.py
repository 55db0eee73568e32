"""QLoRA decode GEMV: y = x·dequant(Wq)ᵀ + b + s·((x·Aᵀ)·Bᵀ + b_B) for a few rows of x (M ≤ 16), no autograd.

The decode-size sibling of qlora_linear.py, with the same math, casts and output dtype as its reference with
dropout 0. At M = 1 the op is a pure stream over the packed NF4 bytes (0.5 B per weight), so the kernel is
built to read each byte once, at HBM speed, and do as little per weight element as possible:

- Launches: `_mm` (lora_linear) computes z = x·Aᵀ [M, r] in float32, then `_qlora_gemv_kernel` does the base
  GEMV and, in its epilogue, the LoRA expand s·(z·B_tileᵀ + b_B), the bias and the output casts. (For decode
  shapes on a GPU `_mm` takes its split-K path, which zeroes z first: one memset more.)
- Tiling: one program per BLOCK_N output rows (× one BLOCK_M tile of rows of x) walks the whole K. Each K step
  loads a [BLOCK_N, NB, INNER] tile of bytes, contiguous along K (each row a run of BLOCK_KB bytes, 16 per
  thread on the GPU: wide, coalesced loads). INNER bytes never cross an absmax block, so the nibble products
  are summed over INNER first and scaled by the block's absmax once, not once per element.
- Per element: nibble split, a 16-entry codebook gather (64 bytes: one L1 line, so a warp's gather is one
  wavefront), and a float32 multiply-add. No tl.dot: with M ≤ 16 rows tensor-core tiles would be mostly
  padding, and at M = 1 the FMAs need ~1/5 of Hopper's FP32 rate at full HBM speed. The gathers come closer
  to their limit (load-unit throughput, ~1 lane per element): the first thing to measure on a GPU.
- No split-K: BLOCK_N shrinks (down to 1) until there are ≥ 4 programs per SM, which every Llama-size layer
  (N ≥ 1024) reaches with whole-K programs. Split-K would add a float32 workspace and a third launch (or
  atomics plus a memset) to serve only layers small enough to be launch-latency bound.
- The dequantized weight is kept in float32 (code·absmax), not rounded to x's dtype as the reference does:
  that rounding would cost a conversion per element on the hot path; the difference stays below the 16-bit
  output's rounding (bitsandbytes' own CUDA GEMV does not match its CPU path bit for bit either).
"""
from __future__ import annotations

import torch

from .backend import HAS_TRITON, use_triton
from .lora_linear import _hi_lo, _mm, _np2, _num_sms, _z_dtype
from .nf4 import NF4State, decode_absmax, launch_args
from .qlora_linear import _check_args, qlora_linear_reference

__all__ = ["qlora_gemv", "qlora_gemv_reference", "qlora_gemv_triton"]


def qlora_gemv_reference(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, lora_bias=None):
    """qlora_linear's reference (PEFT over bnb's Linear4bit) with dropout 0: the definition of correct."""
    return qlora_linear_reference(x, packed, state, bias, lora_a, lora_b, scaling, 0.0, lora_bias)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .nf4 import _to_bf16_rne

    @triton.jit
    def _round(v, TY: tl.constexpr, BF16: tl.constexpr):
        """v cast to TY; bfloat16 by bits, since the interpreter's cast truncates (the GPU's rounds to nearest)."""
        if BF16:
            r = _to_bf16_rne(v.to(tl.float32))
        else:
            r = v.to(TY)
        return r

    @triton.jit
    def _qlora_gemv_kernel(
        x_ptr, q_ptr, absmax_ptr, code_ptr, bias_ptr, z_ptr, b_ptr, lbias_ptr, y_ptr,
        M, N, K, R, ldq, ldabs,
        stride_xm, stride_xk, stride_zm, stride_bn, stride_br, stride_ym,
        s_hi, s_lo,
        HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, F64: tl.constexpr,
        OUT_BF16: tl.constexpr, LORA_BF16: tl.constexpr, HALF_BS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, INNER: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        NB: tl.constexpr = BLOCK_KB // INNER
        ACC: tl.constexpr = tl.float64 if F64 else tl.float32
        OUT: tl.constexpr = y_ptr.dtype.element_ty
        LORA: tl.constexpr = b_ptr.dtype.element_ty
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        rb = tl.arange(0, NB)
        # int64 row offsets: out × in/2 bytes passes 2**31 only for huge layers, but the cost is one multiply.
        q_rows = q_ptr + rn.to(tl.int64)[:, None, None] * ldq + tl.arange(0, INNER)[None, None, :]
        a_rows = absmax_ptr + rn.to(tl.int64)[:, None] * ldabs
        x_rows = (x_ptr + rm.to(tl.int64)[:, None, None] * stride_xm
                  + (rb[:, None] * (2 * INNER) + tl.arange(0, 2 * INNER)[None, :])[None, :, :] * stride_xk)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for kb in range(0, ldq, BLOCK_KB):
            # NB runs of INNER bytes, each inside one absmax block; a run is either whole or past the row's end
            # (K is a multiple of the blocksize), so masks are per run and loads stay vectorized.
            blk = (kb + rb * INNER) // HALF_BS
            mask_b = blk < ldabs
            byte = tl.load(q_rows + (kb + rb * INNER)[None, :, None],
                           mask=mask_n[:, None, None] & mask_b[None, :, None], other=0).to(tl.int32)
            # bnb: element 2j is byte j's high nibble, 2j+1 its low one
            w = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15)))
            scale = tl.load(a_rows + blk[None, :], mask=mask_n[:, None] & mask_b[None, :], other=0.0)
            if F64:  # tests: the reference's weight is code·absmax rounded to float32, element by element
                w = (w * scale[:, :, None]).to(tl.float64)
            xv = tl.load(x_rows + 2 * kb * stride_xk, mask=mask_m[:, None, None] & mask_b[None, :, None],
                         other=0.0).to(ACC)
            part = tl.sum(xv[:, None, :, :] * w[None, :, :, :], axis=3)  # [BLOCK_M, BLOCK_N, NB]
            if F64:
                acc += tl.sum(part, axis=2)
            else:
                acc += tl.sum(part * scale[None, :, :], axis=2)
        # Epilogue in the reference's order: base = (x·Wᵀ + b) in x's dtype; delta = s·(z·Bᵀ + b_B) in the adapter
        # dtype, cast to x's dtype; then base + delta rounded once more.
        if HAS_BIAS:
            acc += _round(tl.load(bias_ptr + rn, mask=mask_n, other=0.0), OUT, OUT_BF16).to(ACC)[None, :]
        base = _round(acc, OUT, OUT_BF16).to(ACC)
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < R
            z = tl.load(z_ptr + rm[:, None] * stride_zm + rr[None, :], mask=mask_m[:, None] & mask_r[None, :],
                        other=0.0).to(ACC)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(ACC)
            delta += tl.sum(z[:, None, :] * b[None, :, :], axis=2)
        if HAS_LBIAS:
            delta += tl.load(lbias_ptr + rn, mask=mask_n, other=0.0).to(ACC)[None, :]
        d = delta * s_hi
        if F64:  # float arguments arrive as fp32: hi + lo keeps the float64 scaling exact
            d += delta * s_lo
        d = _round(_round(d, LORA, LORA_BF16).to(ACC), OUT, OUT_BF16).to(ACC)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], _round(base + d, OUT, OUT_BF16),
                 mask=mask_m[:, None] & mask_n[None, :])


def _gemv_blocks(M: int, N: int, K: int, blocksize: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_KB, INNER, num_warps) for x [M, K] against a [N, K] 4-bit weight.

    - 4 warps × 16 bytes per thread = 2 KiB of weight per program per K step at M ≤ 2 (one 128-bit load per
      thread). Every row of x multiplies every weight element, so the step shrinks as BLOCK_M grows to keep
      ~64 products per thread in registers (and M ≥ 8 is FMA-bound, not byte-bound, anyway).
    - BLOCK_N starts at 16 (x, re-read from L1 per program, is then a fraction of the weight bytes) and halves
      until there are ≥ 4 programs per SM: with 4-warp programs that is 16+ warps of loads in flight per SM,
      enough to cover HBM latency on Hopper (Llama-8B: N = 4096 -> BLOCK_N 4, N = 14336 -> 16; ≥ 896 programs).
    - 4 warps, not 8: the tile is small, and smaller programs pack more of them per SM for the same registers.
    """
    bm = min(16, _np2(M))
    step = min(2048, max(256, 4096 // bm))
    bn = 16
    while bn > 1 and triton.cdiv(N, bn) < 4 * sms:
        bn //= 2
    bkb = min(step // bn, _np2(K // 2))  # no wider than a row: short rows would only load masked bytes
    return bm, bn, bkb, min(blocksize // 2, bkb), 4


def qlora_gemv_triton(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, lora_bias=None):
    """z = x·Aᵀ (`_mm`), then the fused NF4 GEMV + LoRA expand + bias; the weight is never dequantized."""
    _check_args(x, packed, state, 0.0)
    if not HAS_TRITON:
        raise RuntimeError("qlora_gemv_triton needs triton, which is not installed; use qlora_gemv_reference.")
    N, K = state.shape
    if K % state.blocksize:
        raise ValueError(f"qlora_gemv_triton: in_features ({K}) must be a multiple of the 4-bit blocksize "
                         f"({state.blocksize}) so that no quantization block spans two weight rows; use "
                         "qlora_gemv_reference (or re-quantize) for this weight.")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"qlora_gemv_triton: x must be a floating dtype, got {x.dtype}")
    if torch.is_autocast_enabled(x.device.type):  # autocast does not reach into kernels: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, bias = x.to(dtype), (bias.to(dtype) if bias is not None else None)
    x2d = x.reshape(-1, K)  # a view for contiguous x and for row-strided 2-D x; strides go to the kernel
    M, r = x2d.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    q, absmax, code, nested = launch_args(packed, state, x.device)
    absmax = decode_absmax(absmax, nested)  # a torch decode per call for double-quant weights
    z = torch.empty((M, r), device=x.device, dtype=_z_dtype(x, lora_a, lora_b))
    _mm(x2d, lora_a.t(), z)
    bm, bn, bkb, inner, warps = _gemv_blocks(M, N, K, state.blocksize, _num_sms(x.device))
    f64 = torch.float64 in (x.dtype, lora_a.dtype, lora_b.dtype)
    s_hi, s_lo = _hi_lo(float(scaling))
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _qlora_gemv_kernel[grid](
        x2d, q.contiguous(), absmax, code, bias if bias is not None else y, z, lora_b,
        lora_bias if lora_bias is not None else y, y,
        M, N, K, r, K // 2, K // state.blocksize,
        x2d.stride(0), x2d.stride(1), z.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        s_hi, s_lo,
        HAS_BIAS=bias is not None, HAS_LBIAS=lora_bias is not None, F64=f64,
        OUT_BF16=x.dtype == torch.bfloat16, LORA_BF16=lora_b.dtype == torch.bfloat16, HALF_BS=state.blocksize // 2,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KB=bkb, INNER=inner,
        BLOCK_R=min(_np2(max(r, 1)), max(1, 4096 // (bm * bn))), num_warps=warps,
    )
    return y.view(*x.shape[:-1], N)


def qlora_gemv(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, lora_bias=None):
    """x·dequant(Wq)ᵀ + b + s·(x·Aᵀ·Bᵀ + b_B) for decode-size x (few rows), inference only, in x's dtype."""
    if use_triton(x, packed, lora_a, lora_b):
        return qlora_gemv_triton(x, packed, state, bias, lora_a, lora_b, scaling, lora_bias)
    return qlora_gemv_reference(x, packed, state, bias, lora_a, lora_b, scaling, lora_bias)

"""DoRA weight norm: ||W + s·B·A|| per output row, without ever forming an [out, in] matrix.

    ||W + s·B·A||²_row = ||W||²_row + 2s·rowsum(B ⊙ (W·Aᵀ)) + s²·rowsum((B·(A·Aᵀ)) ⊙ B)

W·Aᵀ is [out, r] and A·Aᵀ is [r, r]: one pass over W (dense, or NF4 dequantized in registers) does the work of
PEFT's `torch.linalg.norm(W + s·B·A, dim=1)`, which builds B·A and W + s·B·A on every call. ||W||² depends on the
frozen base only, so callers cache it and hand it back (`weight_sq`); the kernel then skips that reduction.

Numerics: everything is accumulated in float32 (float64 when any input is float64), W read in its own dtype.
The expansion subtracts large terms only when the adapter nearly cancels a row of W (||W + s·B·A|| << ||W||);
there its relative error grows like ||W||² / ||W + s·B·A||² · eps, where PEFT's direct norm stays at eps. DoRA's
updates are small next to W, so this does not arise in practice; the tests pin the agreement with PEFT.
The result is detached by construction (no autograd graph): DoRA treats the norm as a constant (paper §4.3).

Each function returns (norm [out], weight_sq [out]) in the accumulation dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common.autocast import autocast_off
from .common.autograd import OpaqueOp
from .common.backend import HAS_TRITON, use_triton
from .common.dot_policy import DOT_F32, DOT_F64, precision
from .common.nf4_format import NF4State, absmax_f32, check_nf4_args
from .common.tiling import cdiv, hi_lo, np2
from .nf4_dequantize import nf4_dequantize_reference
from .common.launch import launch

__all__ = ["dora_norm", "dora_norm_reference", "dora_norm_triton",
           "dora_norm_nf4", "dora_norm_nf4_reference", "dora_norm_nf4_triton"]


def _acc_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _check(out_f: int, in_f: int, lora_a: Tensor, lora_b: Tensor, weight_sq: Optional[Tensor]) -> None:
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"dora_norm: lora_a must be [r, in] and lora_b [out, r]; got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")
    r = lora_a.shape[0]
    if lora_a.shape[1] != in_f or lora_b.shape != (out_f, r):
        raise ValueError(f"dora_norm: weight [{out_f}, {in_f}] needs lora_a [r, {in_f}] and lora_b [{out_f}, r]; got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if weight_sq is not None and weight_sq.shape != (out_f,):
        raise ValueError(f"dora_norm: weight_sq must have shape ({out_f},), got {tuple(weight_sq.shape)}")


@torch.no_grad()
def _combine(weight_sq: Tensor, wa: Tensor, aat: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    b = lora_b.to(wa.dtype)
    cross = (b * wa).sum(1)
    quad = ((b @ aat) * b).sum(1)
    return (weight_sq + 2.0 * scaling * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


@torch.no_grad()
def dora_norm_reference(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                        weight_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """weight [out, in] (any strides; a transposed view for fan_in_fan_out). The expansion above in torch."""
    _check(weight.shape[0], weight.shape[1], lora_a, lora_b, weight_sq)
    acc = _acc_dtype(weight, lora_a, lora_b, weight_sq)
    # In acc's precision under autocast too (which would run the products in 16 bits): callers cache the results.
    with autocast_off(weight.device):
        w, a = weight.detach().to(acc), lora_a.detach().to(acc)
        if weight_sq is None:
            weight_sq = torch.einsum("ij,ij->i", w, w)  # a reduction, no [out, in] temporary
        return _combine(weight_sq.to(acc), w @ a.T, a @ a.T, lora_b.detach(), float(scaling)), weight_sq.to(acc)


@torch.no_grad()
def dora_norm_nf4_reference(packed: Tensor, state: NF4State, lora_a: Tensor, lora_b: Tensor, scaling: float,
                            weight_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The 4-bit weight as bitsandbytes dequantizes it (in state.dtype), then `dora_norm_reference`."""
    check_nf4_args(packed, state)
    return dora_norm_reference(nf4_dequantize_reference(packed, state), lora_a, lora_b, scaling, weight_sq)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common.jit import to_bf16_rne

    @triton.jit
    def _dora_norm_kernel(
        w_ptr, q_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, aat_ptr, sq_in_ptr, norm_ptr, sq_out_ptr,
        N, K, R, s_hi, s_lo,
        stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        NF4: tl.constexpr, BS: tl.constexpr, W_ROUND: tl.constexpr, HAS_SQ: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        if DOT == 2:
            acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float64)
            sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        half = tl.arange(0, BLOCK_K // 2)
        for k0 in range(0, K, BLOCK_K):
            rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            if NF4:
                # bnb's layout: byte j of a row holds elements 2j (high nibble) and 2j+1;
                # BLOCK_K divides the blocksize, so the tile's row n shares one absmax.
                ldq = K // 2
                byte = tl.load(q_ptr + rn[:, None] * ldq + (k0 // 2 + half)[None, :],
                               mask=mask_n[:, None] & ((k0 // 2 + half) < ldq)[None, :], other=0).to(tl.int32)
                hi = tl.load(code_ptr + (byte >> 4))
                lo = tl.load(code_ptr + (byte & 15))
                vals = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
                amax = tl.load(absmax_ptr + rn * (K // BS) + k0 // BS, mask=mask_n, other=0.0)
                w = vals * amax[:, None]
                # bnb hands PEFT the weight in the quant state's dtype: round as it does.
                if W_ROUND == 1:
                    w = to_bf16_rne(w).to(tl.float32)
                if W_ROUND == 2:
                    w = w.to(tl.float16).to(tl.float32)
            else:
                w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                            mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            a = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if DOT == 2:
                w = w.to(tl.float64)
                a = a.to(tl.float64)
            else:  # float32 operands whatever W's dtype: the interpreter garbles bf16 dots, and the norm is small work
                w = w.to(tl.float32)
                a = a.to(tl.float32)
            if DOT == 2 and NF4:
                # triton 3.6 cannot lower an fp64 dot whose operand was built in registers (join/reshape of the
                # nibbles): "fp64 don't support largeK MMA". float64 is for tests: an explicit reduction does.
                acc += tl.sum(w[:, :, None] * a[None, :, :], axis=1)
            else:
                acc += tl.dot(w, a, input_precision=PRECISION)
            if not HAS_SQ:
                sq += tl.sum(w * w, axis=1)
        if HAS_SQ:
            sq = tl.load(sq_in_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)
        else:
            tl.store(sq_out_ptr + rn, sq, mask=mask_n)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(acc.dtype)
        aat = tl.load(aat_ptr + rr[:, None] * R + rr[None, :], mask=mask_r[:, None] & mask_r[None, :],
                      other=0.0).to(acc.dtype)
        s = tl.zeros((BLOCK_N,), dtype=acc.dtype) + s_hi
        if DOT == 2:  # float arguments arrive as fp32: hi + lo, added in float64, keeps the scaling exact
            s = s + s_lo
        cross = tl.sum(b * acc, axis=1)
        quad = tl.sum(tl.dot(b, aat, input_precision=PRECISION) * b, axis=1)
        total = sq + 2.0 * s * cross + s * s * quad
        tl.store(norm_ptr + rn, tl.sqrt(tl.maximum(total, 0.0)), mask=mask_n)


def _launch(out_f: int, in_f: int, lora_a: Tensor, lora_b: Tensor, scaling: float, weight_sq: Optional[Tensor],
            acc: torch.dtype, *, weight: Optional[Tensor] = None, nf4: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    if not HAS_TRITON:
        raise RuntimeError("dora_norm_triton needs triton, which is not installed; use dora_norm_reference.")
    device = lora_a.device
    r = lora_a.shape[0]
    norm = torch.empty(out_f, device=device, dtype=acc)
    sq_out = torch.empty(out_f, device=device, dtype=acc) if weight_sq is None else weight_sq.to(acc).contiguous()
    if out_f == 0:
        return norm, sq_out
    a_acc = lora_a.to(acc)  # callers pass detached adapters (dora_norm_triton, dora_norm_nf4_triton)
    aat = (a_acc @ a_acc.T).contiguous()  # [r, r]: tiny, torch's matmul
    s_hi, s_lo = hi_lo(float(scaling))  # kernel arguments, not a tensor: no host-to-device copy per call
    dot = DOT_F64 if acc == torch.float64 else DOT_F32
    br = max(16, np2(r))
    bn = 32 if br <= 64 else 16
    if nf4 is not None and dot == DOT_F64:
        bn = 16  # the float64 NF4 path reduces a [BLOCK_N, BLOCK_K, BLOCK_R] product: keep it small
    if nf4 is not None:
        packed, absmax, code, blocksize, w_round = nf4
        bk = min(64, blocksize)
        w_arg, strides = packed, (0, 0)
    else:
        bk = min(64 if br <= 64 else 32, max(16, np2(in_f)))
        packed = absmax = code = weight
        blocksize, w_round = 64, 0
        w_arg, strides = weight, (weight.stride(0), weight.stride(1))
    launch(_dora_norm_kernel, (cdiv(out_f, bn),),
        w_arg, packed, absmax, code, lora_a, lora_b, aat, sq_out, norm, sq_out,
        out_f, in_f, r, s_hi, s_lo,
        strides[0], strides[1], lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        NF4=nf4 is not None, BS=blocksize, W_ROUND=w_round, HAS_SQ=weight_sq is not None,
        DOT=dot, PRECISION=precision(dot), BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
    )
    return norm, sq_out


def _dense(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
           weight_sq: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    acc = _acc_dtype(weight, lora_a, lora_b, weight_sq)
    return _launch(weight.shape[0], weight.shape[1], lora_a, lora_b, scaling, weight_sq, acc, weight=weight)


def _nf4(flat: Tensor, absmax: Tensor, code: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
         weight_sq: Optional[Tensor], out_f: int, in_f: int, blocksize: int, w_round: int) -> tuple[Tensor, Tensor]:
    acc = _acc_dtype(lora_a, lora_b, weight_sq)
    return _launch(out_f, in_f, lora_a, lora_b, scaling, weight_sq, acc, nf4=(flat, absmax, code, blocksize, w_round))


def _dense_op(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
              weight_sq: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    norm, sq = _dense(weight, lora_a, lora_b, scaling, weight_sq)
    return norm, sq.clone() if weight_sq is not None else sq


def _nf4_op(flat: Tensor, absmax: Tensor, code: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
            weight_sq: Optional[Tensor], out_f: int, in_f: int, blocksize: int, w_round: int) -> tuple[Tensor, Tensor]:
    norm, sq = _nf4(flat, absmax, code, lora_a, lora_b, scaling, weight_sq, out_f, in_f, blocksize, w_round)
    return norm, sq.clone() if weight_sq is not None else sq


def _dense_fake(weight, lora_a, lora_b, scaling, weight_sq):
    acc = _acc_dtype(weight, lora_a, lora_b, weight_sq)
    return weight.new_empty(weight.shape[0], dtype=acc), weight.new_empty(weight.shape[0], dtype=acc)


def _nf4_fake(flat, absmax, code, lora_a, lora_b, scaling, weight_sq, out_f, in_f, blocksize, w_round):
    acc = _acc_dtype(lora_a, lora_b, weight_sq)
    return lora_a.new_empty(out_f, dtype=acc), lora_a.new_empty(out_f, dtype=acc)


_DENSE = OpaqueOp("dora_norm", _dense_op, _dense_fake, eager=_dense)
_NF4 = OpaqueOp("dora_norm_nf4", _nf4_op, _nf4_fake, eager=_nf4)


# The kernel holds an r x r tile of A·Aᵀ in shared memory, which an sm_90 block cannot hold beyond this rank:
# larger ranks take the reference (cuBLAS, the same expansion).
MAX_TRITON_RANK = 256


def _check_rank(lora_a: Tensor, name: str) -> None:
    if lora_a.shape[0] > MAX_TRITON_RANK:
        raise ValueError(f"{name}: rank {lora_a.shape[0]} > {MAX_TRITON_RANK}, more than the kernel's tile fits in "
                         "shared memory; use the reference (dora_norm / dora_norm_nf4 dispatch there).")


@torch.no_grad()
def dora_norm_triton(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                     weight_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One launch: out-row tiles, a K loop accumulating W·Aᵀ (and ||W||² unless given), the B terms in the epilogue."""
    _check(weight.shape[0], weight.shape[1], lora_a, lora_b, weight_sq)
    _check_rank(lora_a, "dora_norm_triton")
    return _DENSE(weight.detach(), lora_a.detach(), lora_b.detach(), float(scaling), weight_sq)


@torch.no_grad()
def dora_norm_nf4_triton(packed: Tensor, state: NF4State, lora_a: Tensor, lora_b: Tensor, scaling: float,
                         weight_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """As dora_norm_triton over a bnb-layout 4-bit weight, dequantized tile by tile in registers."""
    check_nf4_args(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"dora_norm_nf4: the 4-bit weight must be 2-D [out, in], got shape {tuple(state.shape)}")
    out_f, in_f = state.shape
    _check(out_f, in_f, lora_a, lora_b, weight_sq)
    _check_rank(lora_a, "dora_norm_nf4_triton")
    if in_f % state.blocksize:
        raise ValueError(f"dora_norm_nf4_triton: in_features ({in_f}) must be a multiple of the 4-bit blocksize "
                         f"({state.blocksize}); use dora_norm_nf4_reference for this weight.")
    flat = packed.reshape(-1)
    flat = (flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)).contiguous()
    code = state.code.to(device=packed.device, dtype=torch.float32).contiguous()
    w_round = {torch.bfloat16: 1, torch.float16: 2}.get(state.dtype, 0)
    return _NF4(flat, absmax_f32(state).contiguous(), code, lora_a.detach(), lora_b.detach(), float(scaling),
                weight_sq, int(out_f), int(in_f), int(state.blocksize), w_round)


def dora_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
              weight_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(||W + s·B·A|| per row, ||W||² per row), detached, in float32 (float64 for float64 inputs)."""
    if use_triton(weight, lora_a, lora_b) and lora_a.shape[0] <= MAX_TRITON_RANK:
        return dora_norm_triton(weight, lora_a, lora_b, scaling, weight_sq)
    return dora_norm_reference(weight, lora_a, lora_b, scaling, weight_sq)


def dora_norm_nf4(packed: Tensor, state: NF4State, lora_a: Tensor, lora_b: Tensor, scaling: float,
                  weight_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """dora_norm over a bnb-layout 4-bit weight; shapes Triton cannot tile (in % blocksize, rank) take the
    reference."""
    if (use_triton(packed, lora_a, lora_b) and len(state.shape) == 2 and state.shape[1] % state.blocksize == 0
            and lora_a.shape[0] <= MAX_TRITON_RANK):
        return dora_norm_nf4_triton(packed, state, lora_a, lora_b, scaling, weight_sq)
    return dora_norm_nf4_reference(packed, state, lora_a, lora_b, scaling, weight_sq)

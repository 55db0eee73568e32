"""QLoRA linear: y = x·dequant(Wq)ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B), Wq a 4-bit NF4/FP4 weight in bnb's layout.

The reference is Hugging Face PEFT's `lora.bnb.Linear4bit.forward` over bitsandbytes' `Linear4bit` on CPU, written
out: the weight is dequantized (code·absmax in float32) and cast to x's dtype, `F.linear` runs in x's dtype; the
LoRA delta runs in the adapter dtype, is cast to the base output's dtype, then added (PEFT's bnb order, which
differs from its dense `lora.Linear`, where the sum is cast: PEFT picks this layer for 4-bit models).

The Triton path: the base matmul is nf4_linear's `nf4_matmul` (one dequantize launch that also decodes a
double-quantized absmax, then cuBLAS; backward dequantizes again instead of keeping the 16-bit weight), and every
LoRA matmul runs in the strided LoRA kernel of common/lora_mm.py (dropout regenerated from a seed).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.autograd import FusedOp, needs_grad
from .common.backend import HAS_TRITON, use_triton
from .common.lora_decode import decodes, mm_decode
from .common.lora_launches import check_factors, lora_backward, lora_forward
from .common.lora_mm import dropout_seed
from .common.nf4_format import NF4State, launch_args
from .common.tiling import rows2d, unrows, unrows_owned, z_dtype
from .nf4_dequantize import nf4_dequantize_reference
from .nf4_linear import check_nf4_linear_args, nf4_matmul

__all__ = ["qlora_linear", "qlora_linear_reference", "qlora_linear_triton"]


def _check_args(x: Tensor, packed: Tensor, state: NF4State, dropout_p: float) -> None:
    check_nf4_linear_args(x, packed, state, op="qlora_linear")
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
# The fused op. NF4State becomes tensors and ints: the packed bytes, the absmax as stored, the codebook, and for a
# double-quantized absmax its decoding tables (launch_args).
# ---------------------------------------------------------------------------------------------------------------
def _nested(nabs, ncode, offset, nbs) -> Optional[tuple]:
    return None if nabs is None else (nabs, ncode, offset, nbs)


def _forward(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nabs: Optional[Tensor],
             ncode: Optional[Tensor], offset: Optional[Tensor], nbs: int, bias: Optional[Tensor],
             lora_a: Tensor, lora_b: Tensor, lora_bias: Optional[Tensor], out_f: int, blocksize: int,
             scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    x2d = rows2d(x)
    y = nf4_matmul(x2d, packed, absmax, code, _nested(nabs, ncode, offset, nbs), out_f, blocksize, trans=False,
                   in_f=x2d.shape[1], bias=bias)
    z = lora_forward(x2d, lora_a, lora_b, y, z_dtype(x, lora_a, lora_b), scaling, dropout_p, seed, accumulate=True,
                     lora_bias=lora_bias)
    return unrows_owned(y, x.shape[:-1]), unrows(z, x.shape[:-1])


def _forward_fake(x, packed, absmax, code, nabs, ncode, offset, nbs, bias, lora_a, lora_b, lora_bias, out_f,
                  blocksize, scaling, dropout_p, seed):
    y = x.new_empty((*x.shape[:-1], out_f))
    z = x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=z_dtype(x, lora_a, lora_b))
    return y, z


def _backward_impl(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nabs: Optional[Tensor],
                   ncode: Optional[Tensor], offset: Optional[Tensor], nbs: int, lora_a: Tensor, lora_b: Tensor,
                   z: Tensor, seed: Optional[Tensor], blocksize: int, scaling: float, dropout_p: float,
                   need_dx: bool, need_da: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); an unneeded gradient comes back empty (custom ops cannot return None)."""
    out_f = lora_b.shape[0]
    dy2d, x2d = rows2d(dy), rows2d(x)
    # dy·dequant(Wq): the weight dequantized again (not kept from forward); the LoRA part adds into it.
    dx2d = nf4_matmul(dy2d.to(x.dtype), packed, absmax, code, _nested(nabs, ncode, offset, nbs), out_f, blocksize,
                      trans=True, in_f=x.shape[-1]) if need_dx else None
    da, db = lora_backward(dy2d, x2d, lora_a, lora_b, z, seed, scaling, dropout_p, need_da, need_db, dx2d,
                           accumulate=True)
    return (unrows(dx2d, x.shape[:-1]) if need_dx else x.new_empty(0)), da, db


def _backward_fake(dy, x, packed, absmax, code, nabs, ncode, offset, nbs, lora_a, lora_b, z, seed, blocksize,
                   scaling, dropout_p, need_dx, need_da, need_db):
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


def _backward(ctx, dy, _dz, *, bwd):
    x, packed, absmax, code, nabs, ncode, offset, lora_a, lora_b, z, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_x, need_b, need_a, need_lb, need_lbias = needs[0], needs[8], needs[9], needs[10], needs[11]
    dx = da = db = dbias = dlbias = None
    if need_x or need_a or need_lb:
        dx, da, db = bwd(dy, x, packed, absmax, code, nabs, ncode, offset, ctx.nbs, lora_a, lora_b, z, seed,
                         ctx.blocksize, ctx.scaling, ctx.dropout_p, need_x, need_a, need_lb)
    dy2d = rows2d(dy) if need_b or need_lbias else None
    if need_b:
        dbias = dy2d.sum(0).to(ctx.bias_dtype)
    if need_lbias:
        dlbias = (dy2d.sum(0, dtype=ctx.lora_bias_dtype) * ctx.scaling).to(ctx.lora_bias_dtype)
    return (dx if need_x else None, None, None, None, None, None, None, None, dbias, da if need_a else None,
            db if need_lb else None, dlbias, None, None, None, None, None)


_OP = FusedOp("qlora_linear", forward=_forward, forward_fake=_forward_fake, backward_impl=_backward_impl,
              backward_fake=_backward_fake, setup_context=_setup_context, backward=_backward)


def qlora_linear_triton(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0,
                        lora_bias=None):
    """The NF4 base matmul (dequantize, then cuBLAS) and every LoRA matmul in the strided LoRA kernel."""
    _check_args(x, packed, state, dropout_p)
    check_factors("qlora_linear", x, state.shape[0], lora_a, lora_b, lora_bias)
    if not HAS_TRITON:
        raise RuntimeError("qlora_linear_triton needs triton, which is not installed; use qlora_linear_reference.")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"qlora_linear_triton: x must be a floating dtype, got {x.dtype}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside the custom op: cast x and the bias as it would, then run with it off.
        dtype = torch.get_autocast_dtype(device_type)
        x, bias = (t.to(dtype) if t is not None else t for t in (x, bias))
        with torch.autocast(device_type, enabled=False):
            return qlora_linear_triton(x, packed, state, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)
    # A double-quantized absmax stays uint8: the dequantize kernel decodes it (no float32 copy, no extra launch).
    packed_flat, absmax, code, nested = launch_args(packed, state, x.device)
    nabs, ncode, offset, nbs = nested if nested is not None else (None, None, None, 0)
    bias = bias.to(x.dtype) if bias is not None else None  # bnb computes the bias in the compute dtype
    grad = needs_grad(x, bias, lora_a, lora_b, lora_bias)
    if decodes(x, lora_a, dropout_p, grad):  # the base (dequantize + cuBLAS, or the GEMV), then one LoRA launch
        x2d = rows2d(x)
        y = nf4_matmul(x2d, packed_flat, absmax, code, nested, int(state.shape[0]), int(state.blocksize),
                       trans=False, in_f=x2d.shape[1], bias=bias)
        mm_decode(x2d, lora_a.t(), lora_b.t(), y, z_dtype(x, lora_a, lora_b), scale=float(scaling), accumulate=True,
                  bias=lora_bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    seed = dropout_seed(x.device) if dropout_p > 0 else None
    return _OP(x, packed_flat, absmax, code, nabs, ncode, offset, nbs, bias, lora_a, lora_b, lora_bias,
               int(state.shape[0]), int(state.blocksize), float(scaling), float(dropout_p), seed, needs_grad=grad)


def qlora_linear(x, packed, state: NF4State, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0,
                 lora_bias=None):
    """x·dequant(Wq)ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B) over a bnb-layout 4-bit weight, in x's dtype."""
    if use_triton(x, packed, lora_a, lora_b):
        return qlora_linear_triton(x, packed, state, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)
    return qlora_linear_reference(x, packed, state, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)

"""NF4 linear without an adapter: y = x·dequant(Wq)ᵀ + b, Wq a 4-bit NF4/FP4 weight in bnb's layout.

What a 4-bit layer that no adapter targets computes (peft_fast.NF4Linear, made by `peft_fast.quantize`). The
reference is bitsandbytes' `Linear4bit` on CPU, written out: dequantize (code·absmax in float32), cast to x's dtype,
`F.linear` in x's dtype. The Triton path dequantizes in one launch and hands the transient 16-bit weight to cuBLAS
(`nf4_matmul`, which qlora_linear shares); backward dequantizes again rather than keeping a 16-bit copy alive
between forward and backward (the memory QLoRA exists to save).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import settings
from .common.backend import HAS_TRITON, use_triton
from .common.nf4_format import NF4State, check_nf4_args, launch_args
from .nf4_dequantize import dequantize_raw, nf4_dequantize_reference
from .nf4_gemv import GEMV_MAX_ROWS, gemv_raw

__all__ = ["nf4_linear", "nf4_linear_reference", "nf4_linear_triton", "nf4_matmul", "check_nf4_linear_args"]


def check_nf4_linear_args(x: Tensor, packed: Tensor, state: NF4State, op: str = "nf4_linear") -> None:
    """Shared by every op over a 2-D 4-bit weight (`op` names the caller in the message)."""
    check_nf4_args(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"{op}: the 4-bit weight must be 2-D [out, in], got shape {tuple(state.shape)}")
    if x.shape[-1] != state.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[-1]} features, the weight {tuple(state.shape)} wants "
                         f"{state.shape[1]}")


def nf4_linear_reference(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    """bitsandbytes' Linear4bit forward (CPU path): the definition of correct. Backward is autograd."""
    check_nf4_linear_args(x, packed, state)
    w = nf4_dequantize_reference(packed, dataclasses.replace(state, dtype=torch.float32)).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def nf4_matmul(a: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested: Optional[tuple], out_f: int,
               blocksize: int, *, trans: bool, in_f: int, bias: Optional[Tensor] = None) -> Tensor:
    """a [M, in] @ dequant(Wq)ᵀ (+ bias) -> [M, out], or with trans a [M, out] @ dequant(Wq) -> [M, in], in a's
    dtype, from `launch_args`' tensors: one dequantize launch, then cuBLAS; the weight is freed on return. `in_f`
    is given, not derived from the packed size: an odd weight size pads the codes by one nibble."""
    if not trans and a.shape[0] <= GEMV_MAX_ROWS and settings.current().nf4_decode == "gemv":
        return gemv_raw(a, packed, absmax, code, nested, out_f, blocksize, bias)  # decode: the codes read once
    w = dequantize_raw(packed, absmax, code, (out_f, in_f), a.dtype, blocksize, nested)
    return a @ w if trans else F.linear(a, w, bias)


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested, bias, out_f, blocksize):
        x2d = x.reshape(-1, x.shape[-1])
        y = nf4_matmul(x2d, packed, absmax, code, nested, out_f, blocksize, trans=False, in_f=x2d.shape[1],
                       bias=bias)
        ctx.save_for_backward(packed, absmax, code)
        ctx.nested, ctx.out_f, ctx.blocksize, ctx.x_shape = nested, out_f, blocksize, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, code = ctx.saved_tensors
        dy2d = dy.reshape(-1, ctx.out_f)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = nf4_matmul(dy2d.contiguous(), packed, absmax, code, ctx.nested, ctx.out_f, ctx.blocksize,
                            trans=True, in_f=ctx.x_shape[-1]).view(ctx.x_shape)
        if ctx.needs_input_grad[5]:
            dbias = dy2d.sum(0).to(ctx.bias_dtype)
        return dx, None, None, None, None, dbias, None, None


def nf4_linear_triton(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    check_nf4_linear_args(x, packed, state)
    if not HAS_TRITON:
        raise RuntimeError("nf4_linear_triton needs triton, which is not installed; use nf4_linear_reference.")
    out_f = state.shape[0]
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, bias = (t.to(dtype) if t is not None else t for t in (x, bias))
        with torch.autocast(device_type, enabled=False):
            return nf4_linear_triton(x, packed, state, bias)
    packed_flat, absmax, code, nested = launch_args(packed, state, x.device)
    bias = bias.to(x.dtype) if bias is not None else None
    return _NF4Linear.apply(x, packed_flat, absmax, code, nested, bias, int(out_f), int(state.blocksize))


def nf4_linear(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    """x·dequant(Wq)ᵀ + b over a bnb-layout 4-bit weight, in x's dtype."""
    if use_triton(x, packed):
        return nf4_linear_triton(x, packed, state, bias)
    return nf4_linear_reference(x, packed, state, bias)

"""NF4 linear without an adapter: y = x·dequant(Wq)ᵀ + b, Wq a 4-bit NF4/FP4 weight in bnb's layout.

What a 4-bit layer that no adapter targets computes (peft_fast.NF4Linear, made by `peft_fast.quantize`). The
reference is bitsandbytes' `Linear4bit` on CPU, written out: dequantize (code·absmax in float32), cast to x's dtype,
`F.linear` in x's dtype. The Triton path shares qlora_linear's base matmul, which picks per row count between the
fused dequant-in-K-loop GEMM and dequantize-then-cuBLAS; backward recomputes the weight rather than keeping a 16-bit
copy alive between forward and backward (the memory QLoRA exists to save).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import HAS_TRITON, use_triton
from .nf4 import NF4State, _check_dequantize_args, launch_args, nf4_dequantize_reference

__all__ = ["nf4_linear", "nf4_linear_reference", "nf4_linear_triton"]


def _check_args(x: Tensor, packed: Tensor, state: NF4State, op: str = "nf4_linear") -> None:
    """Shared by every op over a 2-D 4-bit weight (`op` names the caller in the message)."""
    _check_dequantize_args(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"{op}: the 4-bit weight must be 2-D [out, in], got shape {tuple(state.shape)}")
    if x.shape[-1] != state.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[-1]} features, the weight {tuple(state.shape)} wants "
                         f"{state.shape[1]}")


def nf4_linear_reference(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    """bitsandbytes' Linear4bit forward (CPU path): the definition of correct. Backward is autograd."""
    _check_args(x, packed, state)
    w = nf4_dequantize_reference(packed, dataclasses.replace(state, dtype=torch.float32)).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested, bias, out_f, blocksize):
        from .qlora_linear import _nf4_base_mm

        x2d = x.reshape(-1, x.shape[-1])
        y = _nf4_base_mm(x2d, packed, absmax, code, nested, out_f, blocksize, trans=False, bias=bias)
        ctx.save_for_backward(packed, absmax, code)
        ctx.nested, ctx.out_f, ctx.blocksize, ctx.x_shape = nested, out_f, blocksize, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, dy):
        from .qlora_linear import _nf4_base_mm

        packed, absmax, code = ctx.saved_tensors
        dy2d = dy.reshape(-1, ctx.out_f)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _nf4_base_mm(dy2d.contiguous(), packed, absmax, code, ctx.nested, ctx.out_f, ctx.blocksize,
                              trans=True).view(ctx.x_shape)
        if ctx.needs_input_grad[5]:
            dbias = dy2d.sum(0).to(ctx.bias_dtype)
        return dx, None, None, None, None, dbias, None, None


def nf4_linear_triton(x: Tensor, packed: Tensor, state: NF4State, bias: Optional[Tensor]) -> Tensor:
    _check_args(x, packed, state)
    if not HAS_TRITON:
        raise RuntimeError("nf4_linear_triton needs triton, which is not installed; use nf4_linear_reference.")
    out_f, in_f = state.shape
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

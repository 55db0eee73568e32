"""DoRA with dropout, PEFT's formula: y = x·Wᵀ + b + (c - 1) ⊙ v + c ⊙ s·(xd·Aᵀ)·Bᵀ with xd = drop(x), v = xd·Wᵀ.

PEFT runs the base twice (on x, and on the dropped x) and autograd keeps the dropped copy of x, its mask, and the
adapter's [T, out] output for backward. Here the mask is the LoRA matmuls' own (regenerated from a seed:
common/lora_mm.py), so neither a dropped x nor a mask is kept: the forward makes xd only long enough for the
cuBLAS matmul v = xd·Wᵀ and the LoRA shrink z = xd·Aᵀ, and backward keeps v beside z. The expand's epilogue writes
y = (x·Wᵀ + b) + c ⊙ (v + s·z·Bᵀ) - v over the base output's buffer.

Backward, with dt = c ⊙ dy (one pass that also sums Σ_tokens dy ⊙ v, common/dora_epilogue.py) and D the mask:
- dx = dy·W + D ⊙ ((dt - dy)·W + s·(dt·B)·A), the last term through LoRA's masked dx, the middle one added with
  the mask (`masked_add`);
- dA, dB as LoRA's (dt in place of dy, xd's mask applied in the kernel);
- dc = Σ_tokens dy ⊙ (v + s·z·Bᵀ) = Σ dy ⊙ v + rowsum(B ⊙ dB) / c, since dB = s·diag(c)·dyᵀ·z: the adapter's part
  comes from dB, so nothing [T, out] beyond v is needed. A channel with c = 0 gets 0 for that part, as in
  `dora_linear`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.autograd import FusedOp, needs_grad
from .common.backend import HAS_TRITON, use_triton
from .common.dora_epilogue import dora_expand, dora_scale_grad
from .common.lora_launches import lora_backward
from .common.lora_mm import dropout_seed, masked_add, mm
from .common.tiling import rows2d, z_dtype

__all__ = ["dora_dropout_linear", "dora_dropout_linear_reference", "dora_dropout_linear_triton"]


def dora_dropout_linear_reference(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor, scaling: float,
                                  mag_scale: Tensor, mask: Tensor) -> Tensor:
    """PEFT's DoRA forward on the dropped input x ⊙ mask (mask: 0 or 1/(1-p) per entry of x), in its order."""
    xd = x * mask
    result = F.linear(x, weight, bias)
    v = F.linear(xd, weight)
    lora = F.linear(F.linear(xd.to(lora_a.dtype), lora_a), lora_b)
    c = mag_scale
    return (result + ((c - 1) * v + c * lora * scaling)).to(result.dtype)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, mag_scale: Tensor,
             scaling: float, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    out_f = lora_b.shape[0]
    x2d = rows2d(x)
    M = x2d.shape[0]
    xd = torch.empty_like(x2d)
    masked_add(None, x2d, xd, seed, dropout_p)
    v = F.linear(xd, weight)
    z = torch.empty((M, lora_a.shape[0]), device=x.device, dtype=z_dtype(x, lora_a, lora_b))
    mm(xd, lora_a.t(), z)  # the dropped x exists here: the shrink reads it rather than making the mask again
    del xd
    y = F.linear(x2d, weight, bias)
    dora_expand(z, lora_b, v, y, mag_scale, None, scaling, resid=True)
    return y.view(*x.shape[:-1], out_f), z, v


def _forward_fake(x, weight, bias, lora_a, lora_b, mag_scale, scaling, dropout_p, seed):
    lead = x.shape[:-1]
    y = x.new_empty((*lead, lora_b.shape[0]))
    z = x.new_empty((x[..., 0].numel(), lora_a.shape[0]), dtype=z_dtype(x, lora_a, lora_b))
    v = x.new_empty((x[..., 0].numel(), lora_b.shape[0]))
    return y, z, v


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, z: Tensor, v: Tensor,
                   mag_scale: Tensor, seed: Tensor, scaling: float, dropout_p: float, need_x: bool, need_a: bool,
                   need_b: bool, need_c: bool, need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dc, dW); unneeded ones come back empty."""
    out_f = lora_b.shape[0]
    dy2d, x2d = rows2d(dy), rows2d(x)
    f64 = torch.float64 in (dy.dtype, v.dtype, mag_scale.dtype)
    colsum = torch.zeros(out_f, device=dy.device, dtype=torch.float64 if f64 else torch.float32)
    dt = torch.empty_like(dy2d)
    dora_scale_grad(dy2d, v, mag_scale, None, dt, colsum)
    # contiguous whatever x's layout: the fake implementation promises it (torch.compile relies on that)
    dx2d = torch.empty(x2d.shape, dtype=x.dtype, device=x.device) if need_x else None
    # the adapter's part of dx (masked) written first, dA beside it; dB also when only dc needs it
    da, db = lora_backward(dt, x2d, lora_a, lora_b, z, seed, scaling, dropout_p, need_a, need_b or need_c, dx2d,
                           accumulate=False)
    dw = weight.new_empty(0)
    # (c - 1) ⊙ dy, the dropped base's output gradient, over dt's buffer; from dy itself, not as dt - dy, whose
    # 16-bit cancellation would cost precision where c is near 1
    e = torch.mul(dy2d, mag_scale.to(colsum.dtype) - 1, out=dt)
    if need_x:
        masked_add(dx2d, e @ weight, dx2d, seed, dropout_p)
        dx2d.addmm_(dy2d, weight)
    if need_w:  # a trainable base weight is rare: plain torch, the dropped x made again for it
        xd = torch.empty_like(x2d)
        masked_add(None, x2d, xd, seed, dropout_p)
        dw = (dy2d.t() @ x2d + e.t() @ xd).to(weight.dtype)
    dc = mag_scale.new_empty(0)
    if need_c:
        c = mag_scale.to(colsum.dtype)
        lora_part = (lora_b.to(colsum.dtype) * db.to(colsum.dtype)).sum(1)
        dc = (colsum + torch.where(c != 0, lora_part / torch.where(c != 0, c, 1), 0)).to(mag_scale.dtype)
    return ((dx2d.view(x.shape) if need_x else x.new_empty(0)), da, db if need_b else lora_b.new_empty(0), dc, dw)


def _backward_fake(dy, x, weight, lora_a, lora_b, z, v, mag_scale, seed, scaling, dropout_p, need_x, need_a, need_b,
                   need_c, need_w):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            lora_a.new_empty(lora_a.shape) if need_a else lora_a.new_empty(0),
            lora_b.new_empty(lora_b.shape) if need_b else lora_b.new_empty(0),
            torch.empty_like(mag_scale) if need_c else mag_scale.new_empty(0),
            weight.new_empty(weight.shape) if need_w else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, mag_scale, scaling, dropout_p, seed = inputs
    _, z, v = output
    ctx.mark_non_differentiable(z, v)
    ctx.save_for_backward(x, weight, lora_a, lora_b, z, v, mag_scale, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.needs = tuple(t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b, mag_scale))


def _backward(ctx, dy, _dz, _dv, *, bwd):
    x, weight, lora_a, lora_b, z, v, mag_scale, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_c = ctx.needs
    dx = da = db = dc = dw = dbias = None
    if need_x or need_w or need_a or need_b or need_c:
        dx, da, db, dc, dw = bwd(dy.contiguous(), x, weight, lora_a, lora_b, z, v, mag_scale, seed, ctx.scaling,
                                 ctx.dropout_p, need_x, need_a, need_b, need_c, need_w)
    if need_bias:
        dbias = rows2d(dy).sum(0).to(ctx.bias_dtype)
    return (dx if need_x else None, dw if need_w else None, dbias, da if need_a else None,
            db if need_b else None, dc if need_c else None, None, None, None)


_OP = FusedOp("dora_dropout_linear", forward=_forward, forward_fake=_forward_fake, backward_impl=_backward_impl,
              backward_fake=_backward_fake, setup_context=_setup_context, backward=_backward)


def _check(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, mag_scale: Tensor, dropout_p: float):
    if weight.shape != (lora_b.shape[0], x.shape[-1]) or lora_a.shape[1] != x.shape[-1] or \
            lora_b.shape[1] != lora_a.shape[0] or mag_scale.shape != (lora_b.shape[0],):
        raise ValueError(f"dora_dropout_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a "
                         f"{tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)} and mag_scale "
                         f"{tuple(mag_scale.shape)} do not fit together")
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dora_dropout_linear: dropout_p must be in (0, 1), got {dropout_p}; use dora_linear "
                         "without dropout")


def dora_dropout_linear_triton(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor, scaling: float,
                               mag_scale: Tensor, dropout_p: float) -> Tensor:
    """Two cuBLAS base matmuls, the mask-regenerating LoRA matmuls and DoRA's expand epilogue; the mask's seed is
    drawn from torch's generator (torch.manual_seed reproduces it)."""
    _check(x, weight, lora_a, lora_b, mag_scale, dropout_p)
    if not HAS_TRITON:
        raise RuntimeError("dora_dropout_linear_triton needs triton; use dora_dropout_linear_reference.")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside the custom op: apply its casts to the base operands here, then run without
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = (t.to(dtype) if t is not None else t for t in (x, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return dora_dropout_linear_triton(x, weight, bias, lora_a, lora_b, scaling, mag_scale, dropout_p)
    if weight.dtype != x.dtype:
        raise ValueError(f"dora_dropout_linear: the base weight ({weight.dtype}) and x ({x.dtype}) must have one "
                         "dtype (as F.linear needs); cast one of them, or run under torch.autocast")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    seed = dropout_seed(x.device)
    args = (x, weight, bias, lora_a, lora_b, mag_scale, float(scaling), float(dropout_p), seed)
    return _OP(*args, needs_grad=needs_grad(x, weight, bias, lora_a, lora_b, mag_scale))


def dora_dropout_linear(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor, scaling: float,
                        mag_scale: Tensor, dropout_p: float) -> Tensor:
    """x·Wᵀ + b + (c - 1) ⊙ (drop(x)·Wᵀ) + c ⊙ s·(drop(x)·Aᵀ)·Bᵀ; off Triton the mask comes from torch's dropout."""
    if use_triton(x, weight, lora_a, lora_b, mag_scale):
        return dora_dropout_linear_triton(x, weight, bias, lora_a, lora_b, scaling, mag_scale, dropout_p)
    _check(x, weight, lora_a, lora_b, mag_scale, dropout_p)
    mask = F.dropout(torch.ones_like(x), dropout_p)
    return dora_dropout_linear_reference(x, weight, bias, lora_a, lora_b, scaling, mag_scale, mask)

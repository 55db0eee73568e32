"""Fused DoRA epilogue: y = c ⊙ (base + s·(x·Aᵀ)·Bᵀ) + b, base = x·Wᵀ (no bias).

c = m / ||W + s·B·A|| is DoRA's per-output-channel scale (a tensor, differentiable: its gradient reaches the
magnitude through the caller's division). Give either `weight` (dense: the op runs the base matmul on cuBLAS and
writes y over that fresh buffer, so the forward allocates one [T, out] output, as lora_linear) or the base output
`base` (any base matmul, e.g. the NF4 kernel: autograd carries dbase = c ⊙ dy back through it).

The reference is PEFT's order of operations (`result + (c - 1)·(result - b) + c·lora·s`, result = base + b); the
Triton path computes the algebraically equal c ⊙ (base + s·z·Bᵀ) + b in float32 in one expand kernel whose
epilogue applies c and b while the tile is in registers, writing y once, as LoRA's expand writes its output.
Backward never stores t = base + s·z·Bᵀ: it recovers the magnitude's gradient from the output y, which the next
layer keeps anyway, as dc = Σ_tokens dy ⊙ (y - b) / c, in one pass that also writes dt = c ⊙ dy; on the dense path
dt lives one block of `BWD_BLOCK_ROWS` tokens at a time. A channel with
c = 0 (m = 0) has lost t and gets dc = 0 there (PEFT: Σ dy ⊙ t); DoRA's magnitudes start at row norms, so this
needs a magnitude trained to exactly zero.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.autograd import FusedOp, needs_grad
from .common.backend import HAS_TRITON, use_triton
from .common.dora_epilogue import dora_expand, dora_scale_grad
from .common.lora_decode import decodes, mm_decode
from .common.lora_launches import lora_backward, lora_shrink
from .common.tiling import rows2d, unrows, z_dtype

__all__ = ["dora_linear", "dora_linear_reference", "dora_linear_triton"]


def _check(base: Optional[Tensor], x: Tensor, lora_a: Tensor, lora_b: Tensor, mag_scale: Tensor,
           bias: Optional[Tensor], weight: Optional[Tensor]):
    out_f = lora_b.shape[0]
    if (base is None) == (weight is None):
        raise ValueError("dora_linear: give exactly one of base (the base output x·Wᵀ) and weight")
    if weight is not None and weight.shape != (out_f, x.shape[-1]):
        raise ValueError(f"dora_linear: weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} and lora_b "
                         f"{tuple(lora_b.shape)}")
    shape = base.shape if base is not None else (*x.shape[:-1], out_f)
    if shape[:-1] != x.shape[:-1] or shape[-1] != out_f or x.shape[-1] != lora_a.shape[1] \
            or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"dora_linear: base {tuple(shape)}, x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)} "
                         f"and lora_b {tuple(lora_b.shape)} do not fit together")
    if mag_scale.shape != (out_f,) or (bias is not None and bias.shape != (out_f,)):
        raise ValueError(f"dora_linear: mag_scale and bias must have shape ({out_f},)")


def dora_linear_reference(base: Optional[Tensor], x: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                          lora_b: Tensor, scaling: float, mag_scale: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """PEFT's DoraLinearLayer.forward without dropout, on result = base + bias. Backward is autograd."""
    _check(base, x, lora_a, lora_b, mag_scale, bias, weight)
    if base is None:
        result = F.linear(x, weight, bias)
        base = result
    else:
        result = base + bias if bias is not None else base
    lora = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b)
    base_nb = result - bias if bias is not None else result
    c = mag_scale.view(*([1] * (base.dim() - 1)), -1)
    return (result + ((c - 1) * base_nb + c * lora * scaling)).to(base.dtype)


def _fwd_impl(base, weight, x, bias, lora_a, lora_b, mag_scale, scaling, inplace: bool = False):
    x2d = rows2d(x)
    if base is None:  # our own buffer: y overwrites it
        base2d, inplace = F.linear(x2d, weight), True
    else:
        base2d = rows2d(base)
    z = lora_shrink(x2d, lora_a, z_dtype(x, lora_a, lora_b))
    y2d = base2d if inplace else torch.empty_like(base2d)
    dora_expand(z, lora_b, base2d, y2d, mag_scale, bias, scaling)
    return unrows(y2d, x.shape[:-1]), z


def _decode(base, weight, x, bias, lora_a, lora_b, mag_scale, scaling) -> Tensor:
    """_fwd_impl's y in place over the base output, for inference at decode: one launch for the LoRA delta and
    DoRA's epilogue together."""
    out_f = lora_b.shape[0]
    x2d = rows2d(x)
    y2d = F.linear(x2d, weight) if base is None else rows2d(base)
    mm_decode(x2d, lora_a.t(), lora_b.t(), y2d, z_dtype(x, lora_a, lora_b), scale=scaling, accumulate=True,
              bias=bias, dora_scale=mag_scale)
    return y2d.view(*x.shape[:-1], out_f)


def _forward(base: Optional[Tensor], weight: Optional[Tensor], x: Tensor, bias: Optional[Tensor],
             lora_a: Tensor, lora_b: Tensor, mag_scale: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    return _fwd_impl(base, weight, x, bias, lora_a, lora_b, mag_scale, scaling)


def _forward_fake(base, weight, x, bias, lora_a, lora_b, mag_scale, scaling):
    z = x.new_empty((x[..., 0].numel(), lora_a.shape[0]), dtype=z_dtype(x, lora_a, lora_b))
    y = torch.empty_like(base) if base is not None else x.new_empty((*x.shape[:-1], lora_b.shape[0]))
    return y, z


# Rows per backward block when dt = c ⊙ dy need not be returned (the dense path): dt then exists one block at a
# time, so DoRA's backward holds a [block, out] buffer more than LoRA's, not a second [T, out] one. A block is at
# least BWD_BLOCK_ROWS rows and grows to BWD_BLOCK_BYTES of dt: each block costs ~6 launches, which host-bound
# small blocks (bench/results/), while 64 MiB keeps a 4096-token step of a 4096-wide layer in one block and of a
# 14336-wide one in two (bf16).
BWD_BLOCK_ROWS = 1024
BWD_BLOCK_BYTES = 64 << 20


def _backward_impl(dy: Tensor, y: Tensor, weight: Optional[Tensor], x: Tensor, bias: Optional[Tensor],
                     lora_a: Tensor, lora_b: Tensor, z: Tensor, mag_scale: Tensor, scaling: float, need_x: bool,
                     need_a: bool, need_b: bool, keep_dt: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dt = c ⊙ dy [empty unless keep_dt], dx, dA, dB, dc); dx has the base's part when weight is given (else the
    caller's base op adds it from dt); unneeded ones come back empty."""
    out_f = lora_b.shape[0]
    dy2d, y2d, x2d = rows2d(dy), rows2d(y), rows2d(x)
    M = dy2d.shape[0]
    f64 = torch.float64 in (dy.dtype, y.dtype, mag_scale.dtype)
    colsum = torch.zeros(out_f, device=dy.device, dtype=torch.float64 if f64 else torch.float32)
    keep_dt = keep_dt or weight is None
    dt_full = torch.empty_like(dy2d) if keep_dt else None
    dx2d = torch.empty(x2d.shape, dtype=x.dtype, device=x.device) if need_x else None  # contiguous, as the fake
    da = db = None
    step = max(M, 1) if keep_dt else max(BWD_BLOCK_ROWS, BWD_BLOCK_BYTES // max(1, out_f * dy2d.element_size()))
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        part = (lambda t: t) if r1 - r0 == M else (lambda t: t[r0:r1])  # one block: no slices, no sums
        dt = part(dt_full) if keep_dt else torch.empty_like(part(dy2d))
        dora_scale_grad(part(dy2d), part(y2d), mag_scale, bias, dt, colsum)
        dx_rows = None
        if need_x:
            dx_rows = part(dx2d)
            if weight is not None:  # the base's part on cuBLAS, the LoRA part added by the kernels
                torch.matmul(dt, weight, out=dx_rows)
        da_r, db_r = lora_backward(dt, part(x2d), lora_a, lora_b, part(z), None, scaling, 0.0, need_a, need_b,
                                   dx_rows, accumulate=weight is not None)
        da = da_r if da is None else da.add_(da_r)
        db = db_r if db is None else db.add_(db_r)
    if M == 0:
        da, db = (torch.zeros_like(lora_a) if need_a else None), (torch.zeros_like(lora_b) if need_b else None)
    da = da if need_a else lora_a.new_empty(0)
    db = db if need_b else lora_b.new_empty(0)
    c = mag_scale.to(colsum.dtype)
    dc = torch.where(c != 0, colsum / c, 0).to(mag_scale.dtype)  # the inf/nan of a zero c is never selected
    return ((dt_full.view(dy.shape) if keep_dt else dy.new_empty(0)),
            (dx2d.view(x.shape) if need_x else x.new_empty(0)), da, db, dc)


def _backward_fake(dy, y, weight, x, bias, lora_a, lora_b, z, mag_scale, scaling, need_x, need_a, need_b, keep_dt):
    return (torch.empty_like(dy) if keep_dt or weight is None else dy.new_empty(0),
            x.new_empty(x.shape) if need_x else x.new_empty(0),
            lora_a.new_empty(lora_a.shape) if need_a else lora_a.new_empty(0),
            lora_b.new_empty(lora_b.shape) if need_b else lora_b.new_empty(0), torch.empty_like(mag_scale))


def _setup_context(ctx, inputs, output):
    base, weight, x, bias, lora_a, lora_b, mag_scale, scaling = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    # y, not t = base + s·z·Bᵀ: the next layer holds y anyway, so the magnitude's gradient costs no activation
    ctx.save_for_backward(y, weight, x, bias, lora_a, lora_b, z, mag_scale)
    ctx.scaling = scaling
    ctx.needs = tuple(t is not None and t.requires_grad
                      for t in (base, weight, x, bias, lora_a, lora_b, mag_scale))


def _backward(ctx, dy, _dz, *, bwd):
    y, weight, x, bias, lora_a, lora_b, z, mag_scale = ctx.saved_tensors
    need_base, need_w, need_x, need_bias, need_a, need_b, need_c = ctx.needs
    dt, dx, da, db, dc = bwd(dy.contiguous(), y, weight, x, bias, lora_a, lora_b, z, mag_scale, ctx.scaling, need_x,
                             need_a, need_b, need_base or need_w)
    dbias = rows2d(dy).sum(0).to(bias.dtype) if need_bias else None
    dw = None
    if need_w:  # a trainable base weight is rare: plain torch
        dw = (rows2d(dt).t() @ rows2d(x)).to(weight.dtype)
    return (dt if need_base else None, dw, dx if need_x else None, dbias, da if need_a else None,
            db if need_b else None, dc if need_c else None, None)


_OP = FusedOp("dora_linear", forward=_forward, forward_fake=_forward_fake, backward_impl=_backward_impl,
              backward_fake=_backward_fake, setup_context=_setup_context, backward=_backward)


def dora_linear_triton(base: Optional[Tensor], x: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                       scaling: float, mag_scale: Tensor, weight: Optional[Tensor] = None,
                       overwrite_base: bool = False) -> Tensor:
    """The LoRA shrink in the strided LoRA kernel, the expand with DoRA's epilogue (common/dora_epilogue.py).
    `overwrite_base`: `base` is the caller's own temporary, which inference may overwrite with the output (no
    second [T, out] buffer)."""
    _check(base, x, lora_a, lora_b, mag_scale, bias, weight)
    if not HAS_TRITON:
        raise RuntimeError("dora_linear_triton needs triton, which is not installed; use dora_linear_reference.")
    if weight is not None and (weight.dtype != x.dtype or torch.is_autocast_enabled(x.device.type)):
        # autocast (or mixed dtypes) decides the base matmul's dtype: let torch run it, then take the base path
        return dora_linear_triton(F.linear(x, weight), x, bias, lora_a, lora_b, scaling, mag_scale,
                                  overwrite_base=True)
    out_dtype = base.dtype if base is not None else x.dtype
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    args = [base, weight, x, bias, lora_a, lora_b, mag_scale, float(scaling)]
    grad = needs_grad(*args[:7])
    if not grad and not torch.compiler.is_compiling():
        # eager inference: y overwrites a base the caller gave up (no second [T, out] buffer), else a copy of it
        if base is not None and not (overwrite_base and base.is_contiguous()):
            args[0] = base.contiguous() if not base.is_contiguous() else base.clone()
        if decodes(x, lora_a, 0.0, grad):  # and at decode the whole delta is one launch
            return _decode(*args)
        return _fwd_impl(*args, inplace=True)[0]
    return _OP(*args, needs_grad=grad)


def dora_linear(base: Optional[Tensor], x: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scaling: float, mag_scale: Tensor, weight: Optional[Tensor] = None,
                overwrite_base: bool = False) -> Tensor:
    """c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b; give the base output `base` = x·Wᵀ (no bias), or the dense `weight`.
    `overwrite_base=True`: the output may reuse `base`'s memory (the caller never reads it again)."""
    if use_triton(base, weight, x, lora_a, lora_b, mag_scale):
        return dora_linear_triton(base, x, bias, lora_a, lora_b, scaling, mag_scale, weight, overwrite_base)
    return dora_linear_reference(base, x, bias, lora_a, lora_b, scaling, mag_scale, weight)

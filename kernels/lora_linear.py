"""Dense LoRA linear: y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B).

The reference is Hugging Face PEFT's `lora.Linear.forward` written out, bit for bit on CPU (dropout included,
drawn from the global torch RNG). The Triton path leaves the base matmul to cuBLAS and runs every LoRA-side
matmul, forward and backward, through the strided kernel of common/lora_mm.py, whose dropout mask is
regenerated from a seed rather than stored. With weight=None the op returns only the LoRA delta; the caller owns
the base output and its gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common.autograd import FusedOp, needs_grad
from .common.backend import HAS_TRITON, use_triton
from .common.lora_decode import decodes, mm_decode
from .common.lora_launches import check_factors, lora_backward, lora_forward
from .common.lora_mm import dropout_seed
from .common.tiling import rows2d, unrows_owned, z_dtype

__all__ = ["lora_linear", "lora_linear_reference", "lora_linear_triton", "lora_linear_masked_reference"]


def _check_args(weight: Optional[Tensor], bias: Optional[Tensor], dropout_p: float) -> None:
    if weight is None and bias is not None:
        raise ValueError("lora_linear: bias given without weight; with weight=None the op returns the LoRA delta only.")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1], got {dropout_p}")


def _combine(result, xa, lora_a, lora_b, scaling, lora_bias):
    delta = F.linear(F.linear(xa, lora_a), lora_b, lora_bias) * scaling
    if result is None:
        return delta
    return (result + delta).to(result.dtype)


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, lora_bias=None):
    """PEFT's LoRA Linear forward: the definition of correct. Backward is autograd."""
    _check_args(weight, bias, dropout_p)
    # PEFT's order, base first: the autograd graph then also accumulates dx in PEFT's order, bit for bit.
    result = F.linear(x, weight, bias) if weight is not None else None
    xa = x.to(lora_a.dtype)  # PEFT's _cast_input_dtype
    if dropout_p > 0:
        xa = F.dropout(xa, dropout_p, training=True)
    return _combine(result, xa, lora_a, lora_b, scaling, lora_bias)


def lora_linear_masked_reference(x, weight, bias, lora_a, lora_b, scaling, mask, lora_bias=None):
    """The reference with an explicit dropout multiplier (0 or 1/(1-p), shaped like x), for testing the kernels'
    regenerated masks."""
    _check_args(weight, bias, 0.0)
    result = F.linear(x, weight, bias) if weight is not None else None
    return _combine(result, x.to(lora_a.dtype) * mask.to(lora_a.dtype), lora_a, lora_b, scaling, lora_bias)


# ---------------------------------------------------------------------------------------------------------------
# The fused op: custom ops for torch.compile, an autograd.Function for eager training (common/autograd.py).
# ---------------------------------------------------------------------------------------------------------------
def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
             lora_bias: Optional[Tensor], scaling: float, dropout_p: float,
             seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if weight is not None and bias is not None and x.dim() > 2:
        # F.linear returns a view here (one addmm over the rows): the same addmm, returned as a fresh tensor
        y = unrows_owned(F.linear(rows2d(x), weight, bias), x.shape[:-1])
    elif weight is not None:
        y = F.linear(x, weight, bias)
    else:
        y = torch.empty((*x.shape[:-1], lora_b.shape[0]), device=x.device, dtype=lora_a.dtype)
    # z stays in fp32 (fp64 for fp64 inputs) whatever the adapter dtype: it is kept for dB in backward.
    z = lora_forward(x, lora_a, lora_b, y, z_dtype(x, lora_a, lora_b), scaling, dropout_p, seed,
                     accumulate=weight is not None, lora_bias=lora_bias)
    return y, z


def _decode(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
            lora_bias: Optional[Tensor], scaling: float) -> Tensor:
    """_forward's y for a decode call: the base on cuBLAS, then the whole LoRA delta in one launch."""
    out_f = lora_b.shape[0]
    x2d = rows2d(x)
    if weight is not None:
        y = F.linear(x2d, weight, bias)
    else:
        y = torch.empty((x2d.shape[0], out_f), device=x.device, dtype=lora_a.dtype)
    mm_decode(x2d, lora_a.t(), lora_b.t(), y, z_dtype(x, lora_a, lora_b), scale=scaling,
              accumulate=weight is not None, bias=lora_bias)
    return y.view(*x.shape[:-1], out_f)


def _forward_fake(x, weight, bias, lora_a, lora_b, lora_bias, scaling, dropout_p, seed):
    y_dtype = x.dtype if weight is not None else lora_a.dtype
    y = x.new_empty((*x.shape[:-1], lora_b.shape[0]), dtype=y_dtype)
    z = x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=z_dtype(x, lora_a, lora_b))
    return y, z


def _backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, z: Tensor,
                   seed: Optional[Tensor], scaling: float, dropout_p: float,
                   need_dx: bool, need_da: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); an unneeded gradient comes back empty (custom ops cannot return None)."""
    dx = None
    if need_dx:  # the base's part stays on cuBLAS
        dx = dy @ weight if weight is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    da, db = lora_backward(dy, x, lora_a, lora_b, z, seed, scaling, dropout_p, need_da, need_db, dx,
                           accumulate=weight is not None)
    return (dx if need_dx else x.new_empty(0)), da, db


def _backward_fake(dy, x, weight, lora_a, lora_b, z, seed, scaling, dropout_p, need_dx, need_da, need_db):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_da else lora_a.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_db else lora_b.new_empty(0)
    return dx, da, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, lora_bias, scaling, dropout_p, seed = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, weight, lora_a, lora_b, z, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.lora_bias_dtype = lora_bias.dtype if lora_bias is not None else None


def _backward(ctx, dy, _dz, *, bwd):
    x, weight, lora_a, lora_b, z, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_lb, need_lbias = ctx.needs_input_grad[:6]
    dx = da = db = dw = dbias = dlbias = None
    if need_x or need_a or need_lb:
        dx, da, db = bwd(dy, x, weight, lora_a, lora_b, z, seed, ctx.scaling, ctx.dropout_p, need_x, need_a, need_lb)
    # The frozen base's grads are rare and plain cuBLAS work: torch ops, not our kernel.
    dy2d = rows2d(dy) if need_w or need_b or need_lbias else None
    if need_w:
        dw = (dy2d.t() @ rows2d(x)).to(weight.dtype)
    if need_b:
        dbias = dy2d.sum(0).to(ctx.bias_dtype)
    if need_lbias:
        dlbias = (dy2d.sum(0, dtype=ctx.lora_bias_dtype) * ctx.scaling).to(ctx.lora_bias_dtype)
    return (dx if need_x else None, dw, dbias, da if need_a else None, db if need_lb else None, dlbias,
            None, None, None)


_OP = FusedOp("lora_linear", forward=_forward, forward_fake=_forward_fake, backward_impl=_backward_impl,
              backward_fake=_backward_fake, setup_context=_setup_context, backward=_backward)


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, lora_bias=None):
    """Base matmul on torch, every LoRA matmul (forward and backward) in the strided LoRA kernel."""
    _check_args(weight, bias, dropout_p)
    check_factors("lora_linear", x, weight.shape[0] if weight is not None else None, lora_a, lora_b, lora_bias)
    if not HAS_TRITON:
        raise RuntimeError("lora_linear_triton needs triton, which is not installed; use lora_linear_reference.")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside the custom op: apply its casts to the base operands here (the adapters
        # stay fp32; the kernel meets them in 16 bits anyway), then run with autocast off.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = (t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)
    grad = needs_grad(x, weight, bias, lora_a, lora_b, lora_bias)
    if decodes(x, lora_a, dropout_p, grad):
        return _decode(x, weight, bias, lora_a, lora_b, lora_bias, float(scaling))
    seed = dropout_seed(x.device) if dropout_p > 0 else None
    return _OP(x, weight, bias, lora_a, lora_b, lora_bias, float(scaling), float(dropout_p), seed, needs_grad=grad)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, lora_bias=None):
    """x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B); with weight=None, the LoRA delta alone in lora_a's dtype."""
    if use_triton(x, weight, lora_a, lora_b):
        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)

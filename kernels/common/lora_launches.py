"""The LoRA side of the fused training ops as prepared launches: the shrink and expand of a forward, and the two
launches of a backward, each worked out once per signature (shapes, strides, dtypes, scaling, dropout, the gradients
wanted, the global switches) and then fired with nothing but the call's tensors.

A call costs one cache lookup, the buffers it returns, and the launches (the issue's lean launch path): no views (a
transposed operand is the tensor itself with its strides swapped in the plan; [..., d] activations whose leading
dims collapse are read in place as [rows, d]) and no per-launch configuration. The matmuls are common/lora_mm.py's,
so results are those of `mm` on the same operands (and of two `mm`s for a paired launch).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .lora_mm import DROP_A, DROP_B, DROP_C, DROP_NONE, Launch, fire, fire2, prepare, prepare2, state
from .tiling import row_strides, rows2d


def check_factors(op: str, x: Tensor, out_f: Optional[int], lora_a: Tensor, lora_b: Tensor,
                  lora_bias: Optional[Tensor] = None) -> None:
    """The LoRA factors fit x ([..., in]) and each other (A [r, in], B [out, r], B's bias [out]), and B's out the
    base's (`out_f`, None without a base): the kernels read by these sizes, so a mismatch would read or write past
    a tensor instead of failing as a matmul does."""
    r, out = lora_a.shape[0], lora_b.shape[0]
    if (lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != x.shape[-1] or lora_b.shape[1] != r
            or (out_f is not None and out != out_f) or (lora_bias is not None and tuple(lora_bias.shape) != (out,))):
        raise ValueError(f"{op}: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
                         + (f", lora_bias {tuple(lora_bias.shape)}" if lora_bias is not None else "")
                         + (f" and the base's {out_f} outputs" if out_f is not None else "")
                         + " do not fit together: A is [r, in], B [out, r], B's bias [out].")


def _rows(t: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """t and its [rows, last dim] strides, copied into that shape only when its leading dims do not collapse."""
    s = row_strides(t)
    if s is None:
        t = rows2d(t)
        s = t.stride()
    return t, s


def _t(s: tuple[int, int]) -> tuple[int, int]:
    return s[1], s[0]


class _Forward(NamedTuple):
    shrink: Launch  # z = drop(x)·Aᵀ
    expand: Launch  # y (+)= s·(z·Bᵀ + b_B)


@functools.lru_cache(maxsize=4096)
def _forward_plan(M, in_f, r, out_f, sx, sa, sb, sy, x_dtype, a_dtype, b_dtype, z_dtype, y_dtype, device, glob,
                  scaling, p, accumulate, has_bias) -> _Forward:
    drop = DROP_A if p > 0 else DROP_NONE
    shrink = prepare(M, r, in_f, sx, _t(sa), (r, 1), x_dtype, a_dtype, z_dtype, device, glob, drop=drop, p=p,
                     ld_x=in_f, rows_x=M)
    expand = prepare(M, out_f, r, (r, 1), _t(sb), sy, z_dtype, b_dtype, y_dtype, device, glob, scale=scaling,
                     accumulate=accumulate, has_bias=has_bias)
    return _Forward(shrink, expand)


def lora_forward(x: Tensor, lora_a: Tensor, lora_b: Tensor, y: Tensor, z_dtype: torch.dtype, scaling: float,
                 dropout_p: float, seed: Optional[Tensor], accumulate: bool, lora_bias: Optional[Tensor]) -> Tensor:
    """z = drop(x)·Aᵀ (returned, shaped [..., r] like x, for backward) and y (+)= s·(z·Bᵀ + b_B) in place; y is
    [..., out] over the same rows as x. Two launches."""
    r, in_f = lora_a.shape
    lead = x.shape[:-1]
    M = lead.numel()
    x, sx = _rows(x)
    z = torch.empty((*lead, r), device=x.device, dtype=z_dtype)
    sy = row_strides(y)
    if sy is None:
        raise ValueError("lora_forward: y must be contiguous or 2-D (it is written in place)")
    if lora_bias is not None and lora_bias.stride(0) != 1:
        lora_bias = lora_bias.contiguous()  # the kernel reads it as contiguous
    plan = _forward_plan(M, in_f, r, lora_b.shape[0], sx, lora_a.stride(), lora_b.stride(), sy, x.dtype,
                         lora_a.dtype, lora_b.dtype, z_dtype, y.dtype, y.device, state(), float(scaling),
                         float(dropout_p), accumulate, lora_bias is not None)
    fire(plan.shrink, x, lora_a, z, None, seed)
    fire(plan.expand, z, lora_b, y, lora_bias)
    return z


@functools.lru_cache(maxsize=4096)
def _shrink_plan(M, in_f, r, sx, sa, x_dtype, a_dtype, z_dtype, device, glob) -> Launch:
    return prepare(M, r, in_f, sx, _t(sa), (r, 1), x_dtype, a_dtype, z_dtype, device, glob)


def lora_shrink(x: Tensor, lora_a: Tensor, z_dtype: torch.dtype) -> Tensor:
    """z = x·Aᵀ, shaped [..., r] like x: a forward's first launch alone, for ops with an expand of their own."""
    r, in_f = lora_a.shape
    lead = x.shape[:-1]
    x, sx = _rows(x)
    z = torch.empty((*lead, r), device=x.device, dtype=z_dtype)
    fire(_shrink_plan(lead.numel(), in_f, r, sx, lora_a.stride(), x.dtype, lora_a.dtype, z_dtype, x.device, state()),
         x, lora_a, z)
    return z


class _Backward(NamedTuple):
    first: object  # dB beside dz (Launch2), or one of them (Launch), or None
    second: object  # dA beside dx, or one of them, or None


@functools.lru_cache(maxsize=4096)
def _backward_plan(M, in_f, r, out_f, sdy, sx, sa, sb, sz, sdx, dy_dtype, x_dtype, a_dtype, b_dtype, z_dtype,
                   dx_dtype, device, glob, scaling, p, need_da, need_db, accumulate) -> _Backward:
    need_dx = sdx is not None
    need_dz = need_dx or need_da
    mask = dict(p=p, ld_x=in_f, rows_x=M)
    # dB = s·dyᵀ·z [out, r] and dz = s·dy·B [M, r]
    db = prepare(out_f, r, M, _t(sdy), sz, (r, 1), dy_dtype, z_dtype, b_dtype, device, glob, scale=scaling,
                 may_split=not need_dz) if need_db else None
    dz = prepare(M, r, out_f, sdy, sb, (r, 1), dy_dtype, b_dtype, z_dtype, device, glob, scale=scaling,
                 may_split=not need_db) if need_dz else None
    # dA = dzᵀ·drop(x) [r, in] and dx (+)= drop(dz·A) [M, in]
    da = prepare(r, in_f, M, (1, r), sx, (in_f, 1), z_dtype, x_dtype, a_dtype, device, glob,
                 drop=DROP_B if p > 0 else DROP_NONE, may_split=not need_dx, **mask) if need_da else None
    dx = prepare(M, in_f, r, (r, 1), sa, sdx, z_dtype, a_dtype, dx_dtype, device, glob, accumulate=accumulate,
                 drop=DROP_C if p > 0 else DROP_NONE, may_split=not need_da, **mask) if need_dx else None
    return _Backward(prepare2(db, dz) if db and dz else (db or dz), prepare2(da, dx) if da and dx else (da or dx))


def lora_backward(dy: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, z: Tensor, seed: Optional[Tensor],
                  scaling: float, dropout_p: float, need_da: bool, need_db: bool, dx: Optional[Tensor],
                  accumulate: bool) -> tuple[Tensor, Tensor]:
    """The LoRA side of backward, shared by every op with a LoRA branch: dB = s·dyᵀ·z, dA = (s·dy·B)ᵀ·drop(x), and,
    when dx is given, drop-mask ⊙ (s·dy·B)·A added into it (or written, accumulate=False). dy, x, z and dx are
    [..., d] over the same rows. Returns (dA, dB), empty when not needed. Two launches: dB beside dz = s·dy·B, then
    dA beside dx (each pair reads one input)."""
    r, in_f = lora_a.shape
    M = x.shape[:-1].numel()
    dy, sdy = _rows(dy)
    x, sx = _rows(x)
    z, sz = _rows(z)
    sdx = None
    if dx is not None:
        sdx = row_strides(dx)
        if sdx is None:
            raise ValueError("lora_backward: dx must be contiguous or 2-D (it is written in place)")
    plan = _backward_plan(M, in_f, r, lora_b.shape[0], sdy, sx, lora_a.stride(), lora_b.stride(), sz, sdx,
                          dy.dtype, x.dtype, lora_a.dtype, lora_b.dtype, z.dtype, dx.dtype if dx is not None else None,
                          x.device, state(), float(scaling), float(dropout_p), need_da, need_db, accumulate)
    device = x.device
    db = torch.empty(lora_b.shape, device=device, dtype=lora_b.dtype) if need_db else lora_b.new_empty(0)
    dz = torch.empty((M, r), device=device, dtype=z.dtype) if dx is not None or need_da else None
    if isinstance(plan.first, Launch):
        fire(plan.first, *((dy, z, db) if need_db else (dy, lora_b, dz)))
    elif plan.first is not None:
        fire2(plan.first, (dy, z, db), (dy, lora_b, dz))
    da = torch.empty(lora_a.shape, device=device, dtype=lora_a.dtype) if need_da else lora_a.new_empty(0)
    if isinstance(plan.second, Launch):
        fire(plan.second, *((dz, x, da) if need_da else (dz, lora_a, dx)), seed=seed)
    elif plan.second is not None:
        fire2(plan.second, (dz, x, da), (dz, lora_a, dx), seed)
    return da, db

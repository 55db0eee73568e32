"""Dense LoRA linear: y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B).

The reference is Hugging Face PEFT's `lora.Linear.forward` written out, bit for bit on CPU (dropout included,
drawn from the global torch RNG). The Triton path leaves the base matmul to cuBLAS and runs every LoRA-side
matmul, forward and backward, through one strided kernel. Its dropout mask is never stored: it is regenerated
from (seed, element index of x), so forward and backward see the same mask and no dropped copy of x exists.
With weight=None the op returns only the LoRA delta; the caller owns the base output and its gradient.
"""
from __future__ import annotations

import functools
import struct
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import HAS_TRITON, use_triton
from .dot_policy import dot_mode, precision

__all__ = ["lora_linear", "lora_linear_reference", "lora_linear_triton"]


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


def _lora_linear_masked_reference(x, weight, bias, lora_a, lora_b, scaling, mask, lora_bias=None):
    """The reference with an explicit dropout multiplier (0 or 1/(1-p), shaped like x), for testing our masks."""
    _check_args(weight, bias, 0.0)
    result = F.linear(x, weight, bias) if weight is not None else None
    return _combine(result, x.to(lora_a.dtype) * mask.to(lora_a.dtype), lora_a, lora_b, scaling, lora_bias)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel: C[M,N] (+)= scale · (drop?(A_op) @ drop?(B_op) (+ bias[N])), masked by DROP on C if asked.
# ---------------------------------------------------------------------------------------------------------------
_DROP_NONE, _DROP_A, _DROP_B, _DROP_C = 0, 1, 2, 3

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _keep_scale(seed, rows, col0, ld4, p, inv_hi, inv_lo, ROWS: tl.constexpr, COLS: tl.constexpr,
                    IDX64: tl.constexpr, EXACT: tl.constexpr):
        """Dropout multiplier (0 or 1/(1-p)) of x[rows, col0:col0+COLS]. One Philox call yields 4 numbers, so
        columns go in groups of 4 (col0 is a multiple of 16): offset = row·ceil(in/4) + col//4."""
        groups = col0 // 4 + tl.arange(0, COLS // 4)
        offs = rows[:, None] * ld4 + groups[None, :]
        if not IDX64:
            offs = offs.to(tl.int32)  # 32-bit Philox is cheaper; 64-bit only when offsets need it
        u0, u1, u2, u3 = tl.rand4x(seed, offs)
        u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (ROWS, COLS))
        # One return statement: the compiler rejects two of different types even under a constexpr branch.
        if EXACT:  # float arguments arrive as fp32; hi + lo keeps float64 exact
            keep = (u >= p).to(tl.float64)
            factor = keep * inv_hi + keep * inv_lo
        else:
            factor = (u >= p).to(tl.float32) * inv_hi
        return factor

    @triton.jit
    def _lora_mm_kernel(
        a_ptr, b_ptr, c_ptr, bias_ptr, seed_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        scale_hi, scale_lo, p, inv_keep_hi, inv_keep_lo, ld4, k_tiles,
        ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, DROP: tl.constexpr, IDX64: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
        # int64 offsets: tokens × features can pass 2**31 elements on long-context batches
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = rm < M
        mask_n = rn < N
        if DROP != 0:
            seed = tl.load(seed_ptr)  # a tensor, not an argument: drawing it costs no host sync
        if DOT == 2:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_tiles * BLOCK_K
        for kt in range(0, k_tiles):
            rk = (k_start + kt * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if DOT == 1:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if DOT == 2:
                a = a.to(tl.float64)
                b = b.to(tl.float64)
            if DOT == 3:
                a = a.to(tl.bfloat16)
                b = b.to(tl.bfloat16)
            if DOT == 4:
                a = a.to(tl.float16)
                b = b.to(tl.float16)
            # The dropped operand's (row, col) are the coordinates of x[M, in]: the mask is a function of the seed
            # and x's element index only, whichever product consumes it.
            if DROP == 1:
                a = (a * _keep_scale(seed, rm, k_start + kt * BLOCK_K, ld4, p, inv_keep_hi, inv_keep_lo,
                                     BLOCK_M, BLOCK_K, IDX64, DOT == 2)).to(a.dtype)
            if DROP == 2:
                b = (b * _keep_scale(seed, rk, pid_n * BLOCK_N, ld4, p, inv_keep_hi, inv_keep_lo,
                                     BLOCK_K, BLOCK_N, IDX64, DOT == 2)).to(b.dtype)
            acc += tl.dot(a, b, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
        # Float arguments arrive as fp32; the hi/lo split keeps float64 results exact to ~1e-14.
        out = acc * scale_hi
        if DOT == 2:
            out += acc * scale_lo
        if DROP == 3:
            out = out * _keep_scale(seed, rm, pid_n * BLOCK_N, ld4, p, inv_keep_hi, inv_keep_lo,
                                    BLOCK_M, BLOCK_N, IDX64, DOT == 2)
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        mask_c = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(c_ptrs, out, mask=mask_c)
        else:
            if ACCUMULATE:
                out += tl.load(c_ptrs, mask=mask_c, other=0.0).to(out.dtype)
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_c)


def _hi_lo(v: float) -> tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def _np2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _blocks(M: int, N: int, K: int) -> tuple[int, int, int]:
    # tl.dot needs every block dim >= 16. A rank up to 128 fits one N block, so x is streamed once.
    bm = min(64, max(16, _np2(M)))
    bn = min(128 if N <= 128 else 64, max(16, _np2(N)))
    bk = min(32 if bn > 64 else 64, max(16, _np2(K)))
    return bm, bn, bk


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: few programs are fastest, yet decode shapes still take the split-K path


def _split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int, device: torch.device) -> int:
    # Few output tiles over a long K (decode's shrink; dA and dB, whose K is the token count) leave most SMs
    # idle: split K and add partial sums atomically. Atomics reorder the sum, so not in deterministic mode.
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    sms = _num_sms(device)
    if tiles >= sms or K < 8 * bk or torch.are_deterministic_algorithms_enabled():
        return 1
    return max(1, min(triton.cdiv(K, 4 * bk), 2 * sms // tiles))


def _mm(a: Tensor, b: Tensor, c: Tensor, *, scale: float = 1.0, accumulate: bool = False,
        bias: Optional[Tensor] = None, drop: int = _DROP_NONE, seed: Optional[Tensor] = None,
        p: float = 0.0, ld_x: int = 0, rows_x: int = 0) -> None:
    """c[M,N] (+)= scale·(a[M,K] @ b[K,N] (+ bias)), any strides; `drop` applies x's dropout mask to one operand."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    dot = dot_mode(a.dtype, b.dtype, c.dtype)
    bm, bn, bk = _blocks(M, N, K)
    split = 1
    if not accumulate and bias is None and drop != _DROP_C and c.dtype == torch.float32:
        split = _split_k(M, N, K, bm, bn, bk, c.device)
    k_tiles = triton.cdiv(K, bk)
    if split > 1:
        per_split = triton.cdiv(k_tiles, split)
        split = triton.cdiv(k_tiles, per_split)
        k_tiles = per_split
        c.zero_()
    s_hi, s_lo = _hi_lo(float(scale))
    inv = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    i_hi, i_lo = _hi_lo(inv)
    ld4 = triton.cdiv(ld_x, 4)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    _lora_mm_kernel[grid](
        a, b, c, bias if bias is not None else c, seed if seed is not None else c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        s_hi, s_lo, float(p), i_hi, i_lo, ld4, k_tiles,
        ACCUMULATE=accumulate, HAS_BIAS=bias is not None, DROP=drop, IDX64=rows_x * ld4 >= 2**31,
        DOT=dot, PRECISION=precision(dot), SPLIT_K=split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )


def _z_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, differentiable through register_autograd.
# ---------------------------------------------------------------------------------------------------------------
def _fwd_impl(x, weight, bias, lora_a, lora_b, lora_bias, scaling, dropout_p, seed):
    in_f, r, out_f = x.shape[-1], lora_a.shape[0], lora_b.shape[0]
    x2d = x.reshape(-1, in_f)
    M = x2d.shape[0]
    drop = _DROP_A if dropout_p > 0 else _DROP_NONE
    # z stays in fp32 (fp64 for fp64 inputs) whatever the adapter dtype: it is kept for dB in backward.
    z = torch.empty((M, r), device=x.device, dtype=_z_dtype(x, lora_a, lora_b))
    _mm(x2d, lora_a.t(), z, drop=drop, seed=seed, p=dropout_p, ld_x=in_f, rows_x=M)
    if weight is not None:
        y = F.linear(x2d, weight, bias)
    else:
        y = torch.empty((M, out_f), device=x.device, dtype=lora_a.dtype)
    _mm(z, lora_b.t(), y, scale=scaling, accumulate=weight is not None, bias=lora_bias)
    return y.view(*x.shape[:-1], out_f), z.view(*x.shape[:-1], r)


@torch.library.custom_op("peft_fast::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                     lora_bias: Optional[Tensor], scaling: float, dropout_p: float,
                     seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, lora_a, lora_b, lora_bias, scaling, dropout_p, seed)


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, lora_bias, scaling, dropout_p, seed):
    y_dtype = x.dtype if weight is not None else lora_a.dtype
    y = x.new_empty((*x.shape[:-1], lora_b.shape[0]), dtype=y_dtype)
    z = x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=_z_dtype(x, lora_a, lora_b))
    return y, z


@torch.library.custom_op("peft_fast::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, z: Tensor,
                     seed: Optional[Tensor], scaling: float, dropout_p: float,
                     need_dx: bool, need_da: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); an unneeded gradient comes back empty (custom ops cannot return None)."""
    return _bwd_impl(dy, x, weight, lora_a, lora_b, z, seed, scaling, dropout_p, need_dx, need_da, need_db)


def _bwd_impl(dy, x, weight, lora_a, lora_b, z, seed, scaling, dropout_p, need_dx, need_da, need_db):
    in_f, out_f = x.shape[-1], lora_b.shape[0]
    dy2d, x2d = dy.reshape(-1, out_f), x.reshape(-1, in_f)
    dx2d = None
    if need_dx:  # the base's part stays on cuBLAS
        dx2d = dy2d @ weight if weight is not None else torch.empty_like(x2d)
    da, db = lora_backward(dy2d, x2d, lora_a, lora_b, z.reshape(-1, lora_b.shape[1]), seed, scaling, dropout_p,
                           need_da, need_db, dx2d, accumulate=weight is not None)
    return (dx2d.view(x.shape) if need_dx else x.new_empty(0)), da, db


def lora_backward(dy2d: Tensor, x2d: Tensor, lora_a: Tensor, lora_b: Tensor, z2d: Tensor, seed: Optional[Tensor],
                  scaling: float, dropout_p: float, need_da: bool, need_db: bool, dx2d: Optional[Tensor],
                  accumulate: bool) -> tuple[Tensor, Tensor]:
    """The LoRA side of backward, shared by every op with a LoRA branch: dB = s·dyᵀ·z, dA = (s·dy·B)ᵀ·drop(x), and,
    when dx2d is given, drop-mask ⊙ (s·dy·B)·A added into it (or written, accumulate=False). Returns (dA, dB),
    empty when not needed."""
    M, in_f = x2d.shape
    drop = dropout_p > 0
    da, db = lora_a.new_empty(0), lora_b.new_empty(0)
    if need_db:
        db = torch.empty(lora_b.shape, device=x2d.device, dtype=lora_b.dtype)
        _mm(dy2d.t(), z2d, db, scale=scaling)
    if dx2d is not None or need_da:
        dz = torch.empty(z2d.shape, device=x2d.device, dtype=z2d.dtype)
        _mm(dy2d, lora_b, dz, scale=scaling)
        if need_da:
            da = torch.empty(lora_a.shape, device=x2d.device, dtype=lora_a.dtype)
            _mm(dz.t(), x2d, da, drop=_DROP_B if drop else _DROP_NONE, seed=seed, p=dropout_p, ld_x=in_f, rows_x=M)
        if dx2d is not None:
            _mm(dz, lora_a, dx2d, accumulate=accumulate, drop=_DROP_C if drop else _DROP_NONE, seed=seed,
                p=dropout_p, ld_x=in_f, rows_x=M)
    return da, db


@_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, z, seed, scaling, dropout_p, need_dx, need_da, need_db):
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
    ctx.needs = tuple(t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b, lora_bias))


def _backward(ctx, dy, _dz):
    x, weight, lora_a, lora_b, z, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_lb, need_lbias = ctx.needs
    dx = da = db = dw = dbias = dlbias = None
    if need_x or need_a or need_lb:
        bwd = _bwd_impl if getattr(ctx, "eager", False) else _lora_linear_bwd
        dx, da, db = bwd(dy, x, weight, lora_a, lora_b, z, seed, ctx.scaling, ctx.dropout_p, need_x, need_a, need_lb)
    dy2d = dy.reshape(-1, dy.shape[-1])
    # The frozen base's grads are rare and plain cuBLAS work: torch ops, not our kernel.
    if need_w:
        dw = (dy2d.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
    if need_b:
        dbias = dy2d.sum(0).to(ctx.bias_dtype)
    if need_lbias:
        dlbias = (dy2d.sum(0, dtype=ctx.lora_bias_dtype) * ctx.scaling).to(ctx.lora_bias_dtype)
    return (dx if need_x else None, dw, dbias, da if need_a else None, db if need_lb else None, dlbias,
            None, None, None)


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def eager_autograd(name: str, fwd_impl, setup_context, backward) -> type:
    """A plain autograd.Function running a custom op's own forward and backward, for eager training: torch.library's
    dispatch (argument binding, defaults, redispatch) costs tens of µs per call, twice per layer per step, which
    is host time a training step of small layers waits for. torch.compile still sees the custom op. `ctx.eager`
    tells the shared backward to call the backward's implementation directly too."""

    def forward(ctx, *args):
        y, z = fwd_impl(*args)
        setup_context(ctx, args, (y, z))
        ctx.eager = True
        return y, z

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


_EagerLoraLinear = eager_autograd("_EagerLoraLinear", _fwd_impl, _setup_context, _backward)


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, lora_bias=None):
    """Base matmul on torch, every LoRA matmul (forward and backward) in `_lora_mm_kernel`."""
    _check_args(weight, bias, dropout_p)
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
    seed = None
    if dropout_p > 0:
        # torch's generator, so torch.manual_seed reproduces runs; a tensor, so no .item() and no host sync.
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    args = (x, weight, bias, lora_a, lora_b, lora_bias, float(scaling), float(dropout_p), seed)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    ):
        return _fwd_impl(*args)[0]  # eager inference: the custom-op dispatch costs more than decode's kernels
    if not torch.compiler.is_compiling():
        return _EagerLoraLinear.apply(*args)[0]
    return _lora_linear_fwd(*args)[0]


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float = 0.0, lora_bias=None):
    """x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B); with weight=None, the LoRA delta alone in lora_a's dtype."""
    if use_triton(x, weight, lora_a, lora_b):
        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p, lora_bias)

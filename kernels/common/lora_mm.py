"""The strided LoRA matmul every dense LoRA op is built from, forward and backward, and its dropout.

`mm` computes C[M,N] (+)= scale·(drop?(A) @ drop?(B) (+ bias[N])) for operands of any strides, with x's dropout
mask applied to one operand (or to C) when asked. The mask is never stored: it is regenerated from (seed, element
index of x), so forward and backward see the same mask and no dropped copy of x exists.

Launch configurations (blocks, split-K, dot dtype) depend only on shapes, dtypes and global switches, so they are
computed once per combination and cached: a call only looks them up and launches.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import settings
from .backend import HAS_TRITON
from .dot_policy import dot_mode, precision
from .tiling import cdiv, hi_lo, np2, num_sms
from .launch import launch

DROP_NONE, DROP_A, DROP_B, DROP_C = 0, 1, 2, 3

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .jit import acc_zeros, dot_operands

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
    def _mm_tile(
        pid, pid_k, a_ptr, b_ptr, c_ptr, bias_ptr, seed_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        scale_hi, scale_lo, p, inv_keep_hi, inv_keep_lo, ld4, k_tiles,
        ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, DROP: tl.constexpr, IDX64: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Output tile `pid` (K part `pid_k`) of one matmul: what both kernels below run."""
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
        acc = acc_zeros(BLOCK_M, BLOCK_N, DOT)
        k_start = pid_k * k_tiles * BLOCK_K
        for kt in range(0, k_tiles):
            rk = (k_start + kt * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            a, b = dot_operands(a, b, DOT)
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
        _mm_tile(tl.program_id(0), tl.program_id(1), a_ptr, b_ptr, c_ptr, bias_ptr, seed_ptr, M, N, K,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 scale_hi, scale_lo, p, inv_keep_hi, inv_keep_lo, ld4, k_tiles,
                 ACCUMULATE, HAS_BIAS, DROP, IDX64, DOT, PRECISION, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)

    @triton.jit
    def _lora_mm2_kernel(
        tiles1, seed_ptr, p, inv_keep_hi, inv_keep_lo, ld4,
        a1, b1, c1, M1, N1, K1, sam1, sak1, sbk1, sbn1, scm1, scn1, s_hi1, s_lo1, k_tiles1,
        a2, b2, c2, M2, N2, K2, sam2, sak2, sbk2, sbn2, scm2, scn2, s_hi2, s_lo2, k_tiles2,
        ACC1: tl.constexpr, DROP1: tl.constexpr, DOT1: tl.constexpr, PREC1: tl.constexpr,
        BM1: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr,
        ACC2: tl.constexpr, DROP2: tl.constexpr, DOT2: tl.constexpr, PREC2: tl.constexpr,
        BM2: tl.constexpr, BN2: tl.constexpr, BK2: tl.constexpr, IDX64: tl.constexpr,
    ):
        # Two independent matmuls in one launch (the LoRA backward's dB beside dz, then dA beside dx): the first
        # `tiles1` programs take the first one's output tiles, the rest the second's. No split-K: each fills the
        # machine with the other's tiles instead.
        pid = tl.program_id(0)
        if pid < tiles1:
            _mm_tile(pid, 0, a1, b1, c1, c1, seed_ptr, M1, N1, K1, sam1, sak1, sbk1, sbn1, scm1, scn1,
                     s_hi1, s_lo1, p, inv_keep_hi, inv_keep_lo, ld4, k_tiles1,
                     ACC1, False, DROP1, IDX64, DOT1, PREC1, 1, BM1, BN1, BK1)
        else:
            _mm_tile(pid - tiles1, 0, a2, b2, c2, c2, seed_ptr, M2, N2, K2, sam2, sak2, sbk2, sbn2, scm2, scn2,
                     s_hi2, s_lo2, p, inv_keep_hi, inv_keep_lo, ld4, k_tiles2,
                     ACC2, False, DROP2, IDX64, DOT2, PREC2, 1, BM2, BN2, BK2)


    @triton.jit
    def _masked_add_kernel(a_ptr, b_ptr, out_ptr, seed_ptr, M, N, stride_am, stride_an, stride_bm, stride_bn,
                           stride_om, stride_on, p, inv_keep_hi, inv_keep_lo, ld4,
                           HAS_A: tl.constexpr, IDX64: tl.constexpr, EXACT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # out = a + mask ⊙ b over tiles of x's [M, in] layout, the mask of _keep_scale (the matmuls' one)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        keep = _keep_scale(tl.load(seed_ptr), rm, pid_n * BLOCK_N, ld4, p, inv_keep_hi, inv_keep_lo,
                           BLOCK_M, BLOCK_N, IDX64, EXACT)
        out = keep * tl.load(b_ptr + rm[:, None] * stride_bm + rn[None, :] * stride_bn, mask=mask,
                             other=0.0).to(keep.dtype)
        if HAS_A:
            out += tl.load(a_ptr + rm[:, None] * stride_am + rn[None, :] * stride_an, mask=mask,
                           other=0.0).to(keep.dtype)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
                 mask=mask)


def blocks(M: int, N: int, K: int) -> tuple[int, int, int]:
    # tl.dot needs every block dim >= 16. A rank up to 128 fits one N block, so x is streamed once.
    bm = min(64, max(16, np2(M)))
    bn = min(128 if N <= 128 else 64, max(16, np2(N)))
    bk = min(32 if bn > 64 else 64, max(16, np2(K)))
    return bm, bn, bk


def split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int, sms: int, deterministic: bool) -> int:
    # Few output tiles over a long K (decode's shrink; dA and dB, whose K is the token count) leave most SMs
    # idle: split K and add partial sums atomically. Atomics reorder the sum, so not in deterministic mode.
    tiles = cdiv(M, bm) * cdiv(N, bn)
    if tiles >= sms or K < 8 * bk or deterministic:
        return 1
    return max(1, min(cdiv(K, 4 * bk), 2 * sms // tiles))


class MMConfig(NamedTuple):
    grid: tuple[int, int]
    k_tiles: int
    split: int
    dot: int
    precision: str
    block_m: int
    block_n: int
    block_k: int


@functools.lru_cache(maxsize=4096)
def mm_config(M: int, N: int, K: int, a_dtype: torch.dtype, b_dtype: torch.dtype, c_dtype: torch.dtype,
              device: torch.device, may_split: bool, matmul_precision: str, deterministic: bool,
              switches: settings.Settings) -> MMConfig:
    """The launch of one `mm` shape; the last three arguments are the global state it depends on (cache keys)."""
    dot = dot_mode(a_dtype, b_dtype, c_dtype)
    bm, bn, bk = blocks(M, N, K)
    split = split_k(M, N, K, bm, bn, bk, num_sms(device), deterministic) if may_split else 1
    k_tiles = cdiv(K, bk)
    if split > 1:
        per_split = cdiv(k_tiles, split)
        split = cdiv(k_tiles, per_split)  # no split left without K tiles
        k_tiles = per_split
    return MMConfig((cdiv(M, bm) * cdiv(N, bn), split), k_tiles, split, dot, precision(dot), bm, bn, bk)


@functools.lru_cache(maxsize=256)
def _keep_inverse(p: float) -> tuple[float, float]:
    return hi_lo(0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def state() -> tuple:
    """The global switches a launch's configuration depends on: part of every key of prepared launches."""
    return torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(), settings.current()


class Launch(NamedTuple):
    """One `mm` launch with everything but its tensors worked out: its configuration (cfg.split > 1: C is zeroed
    first, split-K adds into it), the kernel's arguments after its five tensors, and its constexprs. Made once per
    signature, so a call costs a cache lookup and the launch."""
    cfg: MMConfig
    tail: tuple
    consts: dict


def prepare(M: int, N: int, K: int, sa: tuple, sb: tuple, sc: tuple, a_dtype: torch.dtype, b_dtype: torch.dtype,
            c_dtype: torch.dtype, device: torch.device, glob: tuple, *, scale: float = 1.0, accumulate: bool = False,
            has_bias: bool = False, drop: int = DROP_NONE, p: float = 0.0, ld_x: int = 0, rows_x: int = 0,
            may_split: bool = True) -> Launch:
    """C[M,N] (+)= scale·(A[M,K] @ B[K,N] (+ bias)) for operands of strides sa, sb, sc (each (row, column)); glob is
    `state()`."""
    may_split = may_split and not (accumulate or has_bias) and drop != DROP_C and c_dtype == torch.float32
    cfg = mm_config(M, N, K, a_dtype, b_dtype, c_dtype, device, may_split, *glob)
    ld4 = (ld_x + 3) // 4
    tail = (M, N, K, *sa, *sb, *sc, *hi_lo(float(scale)), float(p), *_keep_inverse(float(p)), ld4, cfg.k_tiles)
    consts = dict(ACCUMULATE=accumulate, HAS_BIAS=has_bias, DROP=drop, IDX64=rows_x * ld4 >= 2**31, DOT=cfg.dot,
                  PRECISION=cfg.precision, SPLIT_K=cfg.split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k)
    return Launch(cfg, tail, consts)


def fire(plan: Launch, a: Tensor, b: Tensor, c: Tensor, bias: Optional[Tensor] = None,
         seed: Optional[Tensor] = None) -> None:
    """Run a prepared `mm` on these tensors (laid out as prepared; a transposed operand is passed as the tensor
    itself, its strides swapped in the plan)."""
    if plan.cfg.grid[0] == 0:  # no rows or no columns
        return
    if plan.cfg.split > 1:
        c.zero_()
    launch(_lora_mm_kernel, plan.cfg.grid, a, b, c, bias if bias is not None else c, seed if seed is not None else c,
           *plan.tail, **plan.consts)


class Launch2(NamedTuple):
    """Two prepared `mm`s (unsplit, without bias) as one launch of the two-matmul kernel."""
    one: Launch
    two: Launch
    shared: tuple  # p and 1/(1-p) as hi, lo, then ceil(in/4): the dropout mask's, shared by both products
    tail1: tuple
    tail2: tuple
    consts: dict


def prepare2(one: Launch, two: Launch) -> Launch2:
    c1, c2 = one.consts, two.consts
    consts = dict(ACC1=c1["ACCUMULATE"], DROP1=c1["DROP"], DOT1=c1["DOT"], PREC1=c1["PRECISION"],
                  BM1=c1["BLOCK_M"], BN1=c1["BLOCK_N"], BK1=c1["BLOCK_K"],
                  ACC2=c2["ACCUMULATE"], DROP2=c2["DROP"], DOT2=c2["DOT"], PREC2=c2["PRECISION"],
                  BM2=c2["BLOCK_M"], BN2=c2["BLOCK_N"], BK2=c2["BLOCK_K"], IDX64=c1["IDX64"])
    return Launch2(one, two, one.tail[11:15], (*one.tail[:11], one.cfg.k_tiles), (*two.tail[:11], two.cfg.k_tiles),
                   consts)


def fire2(plan: Launch2, first: tuple, second: tuple, seed: Optional[Tensor] = None) -> None:
    """Run two prepared `mm`s, given as (a, b, c) each, in one launch; an empty one leaves the other alone."""
    g1, g2 = plan.one.cfg.grid[0], plan.two.cfg.grid[0]
    if g1 == 0 or g2 == 0:
        fire(plan.one, *first, seed=seed)
        fire(plan.two, *second, seed=seed)
        return
    launch(_lora_mm2_kernel, (g1 + g2,), g1, seed if seed is not None else first[2], *plan.shared,
           *first, *plan.tail1, *second, *plan.tail2, **plan.consts)


@functools.lru_cache(maxsize=4096)
def _prepared(M, N, K, sa, sb, sc, a_dtype, b_dtype, c_dtype, device, glob, scale, accumulate, has_bias, drop, p,
              ld_x, rows_x, may_split) -> Launch:
    return prepare(M, N, K, sa, sb, sc, a_dtype, b_dtype, c_dtype, device, glob, scale=scale, accumulate=accumulate,
                   has_bias=has_bias, drop=drop, p=p, ld_x=ld_x, rows_x=rows_x, may_split=may_split)


def _plan(a: Tensor, b: Tensor, c: Tensor, scale, accumulate: bool, has_bias: bool, drop: int, p, ld_x: int,
          rows_x: int, may_split: bool) -> Launch:
    M, K = a.shape
    return _prepared(M, b.shape[1], K, a.stride(), b.stride(), c.stride(), a.dtype, b.dtype, c.dtype, c.device,
                     state(), scale, accumulate, has_bias, drop, p, ld_x, rows_x, may_split)


def mm(a: Tensor, b: Tensor, c: Tensor, *, scale: float = 1.0, accumulate: bool = False,
       bias: Optional[Tensor] = None, drop: int = DROP_NONE, seed: Optional[Tensor] = None,
       p: float = 0.0, ld_x: int = 0, rows_x: int = 0) -> None:
    """c[M,N] (+)= scale·(a[M,K] @ b[K,N] (+ bias)), any strides; `drop` applies x's dropout mask to one operand."""
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads it as contiguous
    fire(_plan(a, b, c, scale, accumulate, bias is not None, drop, p, ld_x, rows_x, True), a, b, c, bias, seed)


def masked_add(a: Optional[Tensor], b: Tensor, out: Tensor, seed: Tensor, p: float) -> None:
    """out = a + drop-mask ⊙ b (a None: the mask alone), b [M, in] laid out as x: the mask `mm` gives x's entries
    for this seed, so `masked_add(None, x, xd, ...)` is the dropped x the LoRA matmuls saw."""
    M, N = b.shape
    if M == 0 or N == 0:
        return
    bm, bn = min(32, max(16, np2(M))), min(64, max(16, np2(N)))
    i_hi, i_lo = _keep_inverse(float(p))
    ld4 = (N + 3) // 4
    a_arg = a if a is not None else b
    launch(_masked_add_kernel, (cdiv(N, bn), cdiv(M, bm)),
        a_arg, b, out, seed, M, N, a_arg.stride(0), a_arg.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), float(p), i_hi, i_lo, ld4,
        HAS_A=a is not None, IDX64=M * ld4 >= 2**31, EXACT=out.dtype == torch.float64, BLOCK_M=bm, BLOCK_N=bn)


def dropout_seed(device: torch.device) -> Tensor:
    """A dropout seed from torch's generator (torch.manual_seed reproduces runs), as a tensor: no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)

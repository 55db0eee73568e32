"""Triton device functions shared by the kernels."""
from __future__ import annotations

from .backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def dot_operands(a, b, DOT: tl.constexpr):
        """Cast both operands of a tl.dot to the dtype dot_policy chose (DOT_NATIVE keeps them as they are)."""
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
        return a, b

    @triton.jit
    def acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        """A zero accumulator: float64 for float64 dots, float32 otherwise."""
        if DOT == 2:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        return acc

    @triton.jit
    def to_bf16_rne(x):
        """float32 -> bfloat16, round to nearest even, by bits (finite x): the interpreter's cast truncates."""
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)

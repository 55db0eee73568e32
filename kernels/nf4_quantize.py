"""The Triton kernel behind nf4.nf4_quantize_triton: float weights to bitsandbytes' packed 4-bit codes.

Bit for bit nf4.nf4_quantize_reference (itself bnb's CPU quantize_4bit): the block absmax is a torch reduction,
then each element is scaled by 1 / max(absmax, 1e-38), clamped to [-1, 1], and its code is the number of sorted
codebook midpoints strictly below it (a value on a midpoint takes the lower code), mapped back to bnb's code order
(FP4's order is not sorted). Two codes share a byte, the first element in the high nibble; an odd element count
ends with the code of a zero, as bnb pads. Double quantization of the absmax stays in torch (n / blocksize floats).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _code_of(w_ptr, absmax_ptr, mids_ptr, order_ptr, e, m, BLOCKSIZE: tl.constexpr):
        v = tl.load(w_ptr + e, mask=m, other=0.0).to(tl.float32)
        a = tl.load(absmax_ptr + e // BLOCKSIZE, mask=m, other=1.0)
        # 1e-38 is no normal float32, so Triton would lift this division to float64: do it there on purpose and
        # round once to float32 (= float32's correctly rounded 1 / a); the scaling itself stays a float32 multiply,
        # as the reference's, so values next to a midpoint fall on the same side.
        inv = (1.0 / tl.maximum(a.to(tl.float64), 1e-38)).to(tl.float32)
        s = tl.where(a == 0.0, 0.0, tl.minimum(tl.maximum(v * inv, -1.0), 1.0))  # an all-zero block: code of 0
        idx = tl.zeros(e.shape, dtype=tl.int32)
        for j in tl.static_range(15):
            idx += (s > tl.load(mids_ptr + j)).to(tl.int32)
        return tl.load(order_ptr + idx)

    @triton.jit
    def _nf4_quantize_kernel(w_ptr, absmax_ptr, mids_ptr, order_ptr, out_ptr, n,
                             BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr):
        pid = tl.program_id(0)
        if IDX64:
            byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        else:
            byte = pid * BLOCK + tl.arange(0, BLOCK)
        e0 = 2 * byte
        hi = _code_of(w_ptr, absmax_ptr, mids_ptr, order_ptr, e0, e0 < n, BLOCKSIZE)
        lo = _code_of(w_ptr, absmax_ptr, mids_ptr, order_ptr, e0 + 1, e0 + 1 < n, BLOCKSIZE)
        tl.store(out_ptr + byte, ((hi << 4) | lo).to(tl.uint8), mask=e0 < n)


def quantize_codes(flat: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """Packed uint8 codes [(n + 1) // 2, 1] of a flat float weight, given its float32 absmax per block."""
    n = flat.numel()
    order = torch.argsort(code.cpu()).to(flat.device)  # as the reference: the sorted codebook and its midpoints
    mids = ((code[order[:-1]] + code[order[1:]]) / 2).float().contiguous()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=flat.device)
    BLOCK = 1024
    _nf4_quantize_kernel[(triton.cdiv((n + 1) // 2, BLOCK),)](
        flat, absmax.float().contiguous(), mids, order.to(torch.int32).contiguous(), packed, n,
        BLOCKSIZE=blocksize, BLOCK=BLOCK, IDX64=n + 4 * BLOCK >= 2**31)
    return packed

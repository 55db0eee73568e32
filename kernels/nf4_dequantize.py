"""NF4 / FP4 dequantization: bitsandbytes' packed 4-bit codes back to a dense weight, bit for bit.

The reference is bnb's dequantize_4bit written out: code[q] * absmax in float32, cast to the weight dtype; a
double-quantized absmax is code2[q] * absmax2 + offset. The Triton path is one launch over the packed bytes that
also decodes a double-quantized absmax, so dequantize-then-cuBLAS costs one extra launch per base matmul.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .common.backend import HAS_TRITON, use_triton
from .common.autograd import OpaqueOp
from .common.nf4_format import NF4State, absmax_f32, check_nf4_args, launch_args
from .common.launch import launch
from .common.tiling import cdiv

__all__ = ["nf4_dequantize", "nf4_dequantize_reference", "nf4_dequantize_triton", "dequantize_raw"]


def nf4_dequantize_reference(packed: Tensor, state: NF4State) -> Tensor:
    """bitsandbytes.functional.dequantize_4bit, bit for bit: a `state.dtype` tensor of `state.shape`."""
    check_nf4_args(packed, state)
    n = math.prod(state.shape)
    b = packed.reshape(-1)
    q = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    vals = state.code.to(packed.device).float()[q]
    pad = -n % state.blocksize
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, state.blocksize) * absmax_f32(state)[:, None]
    return vals.reshape(-1)[:n].to(state.dtype).view(state.shape)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common.jit import to_bf16_rne

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr, out_ptr, n,
                            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
                            BLOCK: tl.constexpr, IDX64: tl.constexpr, OUT_BF16: tl.constexpr):
        """Each program unpacks BLOCK bytes into 2·BLOCK contiguous elements (element 2j is byte j's high nibble,
        2j+1 its low): the nibbles are joined in registers so that the store is one coalesced run. A double-quantized
        absmax is decoded here too (code2[q]·absmax2 + offset, as bnb), so one launch does the whole job."""
        pid = tl.program_id(0)
        if IDX64:
            byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            elem = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK).to(tl.int64)
        else:
            byte = pid * BLOCK + tl.arange(0, BLOCK)
            elem = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        b = tl.load(packed_ptr + byte, mask=2 * byte < n, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 15))
        vals = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
        mask = elem < n
        blk = elem // BLOCKSIZE
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(ncode_ptr + qa) * tl.load(nabs_ptr + blk // NESTED_BS, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        v = vals * scale
        if OUT_BF16:
            tl.store(out_ptr + elem, to_bf16_rne(v), mask=mask)
        else:
            tl.store(out_ptr + elem, v.to(out_ptr.dtype.element_ty), mask=mask)


def _dequantize(packed: Tensor, absmax: Tensor, code: Tensor, nabs: Optional[Tensor], ncode: Optional[Tensor],
                offset: Optional[Tensor], nested_blocksize: int, shape: list[int], dtype: torch.dtype,
                blocksize: int) -> Tensor:
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    BLOCK = 1024
    grid = (cdiv((n + 1) // 2, BLOCK),)
    nested = nabs is not None
    if not nested:
        nabs, ncode, offset, nested_blocksize = absmax, code, absmax, 1
    # No FMA: code2·absmax2 + offset must round twice, as bitsandbytes' two steps do, to stay bit for bit.
    launch(_nf4_dequant_kernel, grid, packed, absmax, code, nabs, ncode, offset, out, n,
           BLOCKSIZE=blocksize, NESTED=nested, NESTED_BS=nested_blocksize, BLOCK=BLOCK, IDX64=n + 4 * BLOCK >= 2**31,
           OUT_BF16=dtype == torch.bfloat16, enable_fp_fusion=False)
    return out


def _dequantize_fake(packed, absmax, code, nabs, ncode, offset, nested_blocksize, shape, dtype, blocksize):
    return packed.new_empty(shape, dtype=dtype)


_DEQUANTIZE = OpaqueOp("nf4_dequantize_raw", _dequantize, _dequantize_fake)


def dequantize_raw(packed: Tensor, absmax: Tensor, code: Tensor, shape, dtype: torch.dtype, blocksize: int,
                   nested: Optional[tuple] = None) -> Tensor:
    """The Triton dequantization from launch-ready tensors (flat uint8 bytes, float32 codebook, all contiguous on one
    device): what every 4-bit matmul runs before handing the weight to cuBLAS. `absmax` is float32, or with
    `nested` = (nested_absmax, nested_code, offset, nested_blocksize) the uint8 codes of a double-quantized one."""
    nabs, ncode, offset, nbs = nested if nested is not None else (None, None, None, 1)
    return _DEQUANTIZE(packed, absmax, code, nabs, ncode, offset, int(nbs), [int(d) for d in shape], dtype,
                       int(blocksize))


def nf4_dequantize_triton(packed: Tensor, state: NF4State) -> Tensor:
    """One launch over the packed bytes; a nested absmax (n/blocksize floats) is undone by torch first."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_dequantize_triton: triton is not installed")
    check_nf4_args(packed, state)
    flat, absmax, code, nested = launch_args(packed, state, packed.device)
    return dequantize_raw(flat, absmax, code, state.shape, state.dtype, state.blocksize, nested)


def nf4_dequantize(packed: Tensor, state: NF4State) -> Tensor:
    if use_triton(packed):
        return nf4_dequantize_triton(packed, state)
    return nf4_dequantize_reference(packed, state)



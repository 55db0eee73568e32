"""NF4 / FP4 quantization: float weights to bitsandbytes' packed 4-bit codes and state, bit for bit.

The reference is bnb's CPU quantize_4bit written out. The Triton path: the block absmax is a torch reduction,
then each element is scaled by 1 / max(absmax, 1e-38), clamped to [-1, 1], and its code is the number of sorted
codebook midpoints strictly below it (a value on a midpoint takes the lower code), mapped back to bnb's code order
(FP4's order is not sorted). Two codes share a byte, the first element in the high nibble; an odd element count
ends with the code of a zero, as bnb pads. Double quantization of the absmax stays in torch (n / blocksize floats).

Known departures from bitsandbytes 0.50's CPU backend, which treats the last, partial block apart (numel not a
multiple of the blocksize): it divides that block by its absmax, so a value within an ulp of a midpoint may take
the neighbouring code, and it stores that absmax clamped to 1e-38 (for an all-zero partial block, 1e-38 where this
stores 0; the dequantized values agree). Blocks holding inf or NaN (whose absmax makes the whole block
meaningless) may get other codes on the Triton path than the reference's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common.backend import HAS_TRITON, use_triton
from .common.nf4_format import BLOCKSIZES, DTYPES, DYNAMIC_CODE, NESTED_BLOCKSIZE, NF4State, code4
from .common.launch import launch
from .common.tiling import cdiv

__all__ = ["nf4_quantize", "nf4_quantize_reference", "nf4_quantize_triton"]


def _build_lut(code: Tensor) -> Tensor:
    slot = torch.arange(65536, dtype=torch.float32)
    val = -1.0 + (2.0 * slot) / 65535.0
    mids = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(mids, val, side="left").to(torch.uint8)


_DYNAMIC_LUT = _build_lut(DYNAMIC_CODE)


def _check_quantize_args(w: Tensor, blocksize: int, quant_type: str) -> None:
    code4(quant_type)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize}")
    if w.dtype not in DTYPES:
        raise ValueError(f"nf4_quantize: weights must be float32, float16 or bfloat16, got {w.dtype}")
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError(f"nf4_quantize: need a non-empty weight with at least one dim, got shape {tuple(w.shape)}")


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


def _quantize_codes(flat: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """Packed uint8 codes [(n + 1) // 2, 1] of a flat float weight, given its float32 absmax per block."""
    n = flat.numel()
    order = torch.argsort(code.cpu()).to(flat.device)  # as the reference: the sorted codebook and its midpoints
    mids = ((code[order[:-1]] + code[order[1:]]) / 2).float().contiguous()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=flat.device)
    BLOCK = 1024
    launch(_nf4_quantize_kernel, (cdiv((n + 1) // 2, BLOCK),),
        flat, absmax.float().contiguous(), mids, order.to(torch.int32).contiguous(), packed, n,
        BLOCKSIZE=blocksize, BLOCK=BLOCK, IDX64=n + 4 * BLOCK >= 2**31)
    return packed


def _blockwise_absmax(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(flat padded with zeros to whole blocks, viewed [n_blocks, blocksize]; float32 absmax per block)."""
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def _quantize_dynamic(x: Tensor) -> tuple[Tensor, Tensor]:
    """bnb's CPU blockwise 8-bit quantization (dynamic map, blocks of 256) of a float32 vector: (codes, absmax)."""
    n = x.numel()
    blocks, absmax = _blockwise_absmax(x.float(), NESTED_BLOCKSIZE)
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1.0, 1.0).nan_to_num(0.0)  # an all-zero block: 0/0
    slot = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    q = _DYNAMIC_LUT.to(x.device)[slot]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def _quantize(w: Tensor, blocksize: int, compress_statistics: bool, quant_type: str,
              triton_codes: bool = False) -> tuple[Tensor, NF4State]:
    _check_quantize_args(w, blocksize, quant_type)
    code = code4(quant_type).to(w.device)
    blocks, absmax = _blockwise_absmax(w.detach().reshape(-1).float(), blocksize)
    if triton_codes:
        packed = _quantize_codes(w.detach().reshape(-1).contiguous(), absmax, code, blocksize)
    else:
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0).reshape(-1)
        order = torch.argsort(code.cpu()).to(w.device)
        mids = (code[order[:-1]] + code[order[1:]]) / 2
        q = torch.bucketize(scaled, mids, out_int32=True)
        if quant_type != "nf4":
            q = order[q]
        n = w.numel()  # blocks may span rows (bnb flattens the weight); an odd count keeps a padding zero's code
        q = q[:n + n % 2].to(torch.uint8)
        packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    state = NF4State(absmax, w.shape, w.dtype, blocksize, quant_type, code.clone())
    if compress_statistics:
        offset = absmax.mean()
        qabs, abs2 = _quantize_dynamic(absmax - offset)
        state = NF4State(qabs, w.shape, w.dtype, blocksize, quant_type, code.clone(), offset=offset,
                         nested_absmax=abs2, nested_code=DYNAMIC_CODE.to(w.device))
    return packed, state


def nf4_quantize_reference(w: Tensor, blocksize: int = 64, compress_statistics: bool = False,
                           quant_type: str = "nf4") -> tuple[Tensor, NF4State]:
    """bitsandbytes.functional.quantize_4bit, bit for bit: (packed uint8 [(numel+1)//2, 1], state)."""
    return _quantize(w, blocksize, compress_statistics, quant_type)


def nf4_quantize_triton(w: Tensor, blocksize: int = 64, compress_statistics: bool = False,
                        quant_type: str = "nf4") -> tuple[Tensor, NF4State]:
    """The codes and packing in one Triton launch (`_nf4_quantize_kernel`); the block absmax and the double
    quantization of it are torch reductions over n / blocksize values."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_quantize_triton: triton is not installed")
    return _quantize(w, blocksize, compress_statistics, quant_type, triton_codes=True)


def nf4_quantize(w: Tensor, blocksize: int = 64, compress_statistics: bool = False,
                 quant_type: str = "nf4") -> tuple[Tensor, NF4State]:
    if use_triton(w):
        return nf4_quantize_triton(w, blocksize, compress_statistics, quant_type)
    return nf4_quantize_reference(w, blocksize, compress_statistics, quant_type)



"""NF4 (and FP4) 4-bit weights in the bitsandbytes layout, bit for bit.

Layout (bitsandbytes `quantize_4bit`): the weight is flattened row-major and cut into blocks of `blocksize`
elements; each block keeps its float32 absmax and every element becomes the index of the nearest of 16 code
values of x / absmax. Two codes share a byte, the FIRST element in the HIGH nibble; the packed tensor is uint8
shaped [(numel + 1) // 2, 1]. With double quantization (`compress_statistics=True`) the absmax vector is stored
as uint8 codes of (absmax - mean) in bnb's 8-bit dynamic map, in blocks of 256, plus a float32 absmax per
256-block (`nested_absmax`) and the mean (`offset`).

Rounding, as bitsandbytes does it on CPU:
- 4-bit: x * (1 / max(absmax, 1e-38)), clamped to [-1, 1], then the bucket among the float32 midpoints of the
  sorted codebook (a value on a midpoint takes the lower code); FP4 codes are then mapped back to bnb's order.
- 8-bit absmax (double quantization): bnb's 65536-entry lookup table: v = x * (1 / absmax) clamped to [-1, 1],
  slot = trunc((v + 1) * 0.5 * 65535 + 0.5), code index = number of dynamic-map midpoints below the slot's value.
- dequantize: code[q] * absmax in float32, then cast to the weight dtype; nested: code2[q] * absmax2 + offset.

Quantizing is torch on both paths (it runs once per weight; one Triton kernel per file goes to dequantize).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .backend import HAS_TRITON, use_triton

__all__ = [
    "NF4State",
    "NF4_CODE",
    "FP4_CODE",
    "nf4_quantize",
    "nf4_quantize_reference",
    "nf4_quantize_triton",
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_dequantize_triton",
    "nf4_state_from_bnb",
    "nf4_from_bnb",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Quantiles of N(0, 1) normalised to [-1, 1] (Dettmers et al., QLoRA), as bitsandbytes lists them, sorted.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# bnb's FP4 (e2m1 with its own bias), in bnb's code order, scaled by its largest magnitude (12).
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0


def _code4(quant_type: str) -> Tensor:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"nf4: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return NF4_CODE if quant_type == "nf4" else FP4_CODE


def _dynamic_map() -> Tensor:
    """bnb's signed 8-bit dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)):
    for each exponent 10**(i-6), i = 0..6, the midpoints of a 2**i + 1 point linspace over [0.1, 1], both signs,
    plus 0 and 1; float32 arithmetic as bnb does it."""
    parts = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        parts += [(10 ** (i - 6)) * mids, -(10 ** (i - 6)) * mids]
    parts.append(torch.tensor([0.0, 1.0]))
    return torch.sort(torch.cat(parts)).values


DYNAMIC_CODE = _dynamic_map()


def _build_lut(code: Tensor) -> Tensor:
    slot = torch.arange(65536, dtype=torch.float32)
    val = -1.0 + (2.0 * slot) / 65535.0
    mids = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(mids, val, side="left").to(torch.uint8)


_DYNAMIC_LUT = _build_lut(DYNAMIC_CODE)


@dataclass
class NF4State:
    """What a 4-bit weight needs besides its packed codes; field names follow bnb's QuantState.as_dict."""
    absmax: Tensor                      # float32 [n_blocks]; uint8 codes when nested
    shape: torch.Size                   # the weight's shape
    dtype: torch.dtype                  # the weight's dtype (and the dequantized dtype)
    blocksize: int = 64
    quant_type: str = "nf4"
    code: Tensor = None                 # the 16 code values (bnb's quant_map)
    offset: Optional[Tensor] = None     # nested: 0-dim float32 mean of the absmax (nested_offset)
    nested_absmax: Optional[Tensor] = None   # nested: float32 [ceil(n_blocks / 256)]
    nested_code: Optional[Tensor] = None     # nested: the 256-entry dynamic map (nested_quant_map)
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        if self.code is None:
            self.code = _code4(self.quant_type).to(self.absmax.device)
        self.shape = torch.Size(self.shape)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def to(self, device) -> "NF4State":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4State(mv(self.absmax), self.shape, self.dtype, self.blocksize, self.quant_type, mv(self.code),
                        mv(self.offset), mv(self.nested_absmax), mv(self.nested_code), self.nested_blocksize)


def _check_quantize_args(w: Tensor, blocksize: int, quant_type: str) -> None:
    _code4(quant_type)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize}")
    if w.dtype not in _DTYPES:
        raise ValueError(f"nf4_quantize: weights must be float32, float16 or bfloat16, got {w.dtype}")
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError(f"nf4_quantize: need a non-empty weight with at least one dim, got shape {tuple(w.shape)}")


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
    code = _code4(quant_type).to(w.device)
    blocks, absmax = _blockwise_absmax(w.detach().reshape(-1).float(), blocksize)
    if triton_codes:
        from .nf4_quantize import quantize_codes

        packed = quantize_codes(w.detach().reshape(-1).contiguous(), absmax, code, blocksize)
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
    """The codes and packing in one Triton launch (kernels/nf4_quantize.py); the block absmax and the double
    quantization of it are torch reductions over n / blocksize values."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_quantize_triton: triton is not installed")
    return _quantize(w, blocksize, compress_statistics, quant_type, triton_codes=True)


def nf4_quantize(w: Tensor, blocksize: int = 64, compress_statistics: bool = False,
                 quant_type: str = "nf4") -> tuple[Tensor, NF4State]:
    if use_triton(w):
        return nf4_quantize_triton(w, blocksize, compress_statistics, quant_type)
    return nf4_quantize_reference(w, blocksize, compress_statistics, quant_type)


# ---------------------------------------------------------------------------------------------------------------
# Dequantize
# ---------------------------------------------------------------------------------------------------------------
def _check_dequantize_args(packed: Tensor, state: NF4State) -> None:
    _code4(state.quant_type)
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_dequantize: blocksize must be one of {BLOCKSIZES}, got {state.blocksize}")
    if state.dtype not in _DTYPES:
        raise ValueError(f"nf4_dequantize: state.dtype must be float32, float16 or bfloat16, got {state.dtype}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"nf4_dequantize: packed codes must be uint8, got {packed.dtype}")
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"nf4_dequantize: packed has {packed.numel()} bytes (shape {tuple(packed.shape)}) but "
                         f"weight shape {tuple(state.shape)} needs {(n + 1) // 2}")
    blocks = -(-n // state.blocksize)
    if state.absmax.numel() != blocks:
        raise ValueError(f"nf4_dequantize: absmax has {state.absmax.numel()} entries, weight shape "
                         f"{tuple(state.shape)} with blocksize {state.blocksize} needs {blocks}")


def _absmax(state: NF4State) -> Tensor:
    """float32 absmax per block, undoing double quantization as bnb does (code2[q] * absmax2, then + offset)."""
    if not state.nested:
        return state.absmax.float()
    nested = (state.nested_absmax.float(), state.nested_code.float(), state.offset.float(), state.nested_blocksize)
    return decode_absmax(state.absmax.reshape(-1), nested)


def nf4_dequantize_reference(packed: Tensor, state: NF4State) -> Tensor:
    """bitsandbytes.functional.dequantize_4bit, bit for bit: a `state.dtype` tensor of `state.shape`."""
    _check_dequantize_args(packed, state)
    n = math.prod(state.shape)
    b = packed.reshape(-1)
    q = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    vals = state.code.to(packed.device).float()[q]
    pad = -n % state.blocksize
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, state.blocksize) * _absmax(state)[:, None]
    return vals.reshape(-1)[:n].to(state.dtype).view(state.shape)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16_rne(x):
        """float32 -> bfloat16, round to nearest even, by bits (finite x): the interpreter's cast truncates."""
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)

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
            tl.store(out_ptr + elem, _to_bf16_rne(v), mask=mask)
        else:
            tl.store(out_ptr + elem, v.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_raw(packed: Tensor, absmax: Tensor, code: Tensor, shape, dtype: torch.dtype, blocksize: int,
                   nested: Optional[tuple] = None) -> Tensor:
    """The Triton dequantization from launch-ready tensors (flat uint8 bytes, float32 codebook, all contiguous on one
    device): what the fused ops call when dequantize-then-cuBLAS beats the fused GEMM. `absmax` is float32, or with
    `nested` = (nested_absmax, nested_code, offset, nested_blocksize) the uint8 codes of a double-quantized one."""
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    BLOCK = 1024
    grid = (triton.cdiv((n + 1) // 2, BLOCK),)
    nabs, ncode, offset, nbs = nested if nested is not None else (absmax, code, absmax, 1)
    # No FMA: code2·absmax2 + offset must round twice, as bitsandbytes' two steps do, to stay bit for bit.
    _nf4_dequant_kernel[grid](packed, absmax, code, nabs, ncode, offset, out, n,
                              BLOCKSIZE=blocksize, NESTED=nested is not None, NESTED_BS=nbs,
                              BLOCK=BLOCK, IDX64=n + 4 * BLOCK >= 2**31, OUT_BF16=dtype == torch.bfloat16,
                              enable_fp_fusion=False)
    return out


def launch_args(packed: Tensor, state: NF4State, device) -> tuple:
    """(flat uint8 bytes, absmax, float32 code, nested or None) as the kernels take them: absmax stays in its
    stored form (uint8 codes when double-quantized: the kernels decode it, no float32 copy is made)."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    code = state.code.to(device=device, dtype=torch.float32).contiguous()
    if not state.nested:
        return flat.contiguous(), state.absmax.float().contiguous(), code, None
    nested = (state.nested_absmax.float().contiguous(), state.nested_code.float().contiguous(),
              state.offset.float().reshape(1).contiguous(), int(state.nested_blocksize))
    return flat.contiguous(), state.absmax.contiguous(), code, nested


def decode_absmax(absmax: Tensor, nested: Optional[tuple]) -> Tensor:
    """float32 absmax from `launch_args`' form (for the kernels that read one float per block)."""
    if nested is None:
        return absmax
    nabs, ncode, offset, nbs = nested
    pad = -absmax.numel() % nbs
    vals = torch.nn.functional.pad(ncode[absmax.long()], (0, pad)).view(-1, nbs)
    return ((vals * nabs[:, None]).reshape(-1)[:absmax.numel()] + offset).float().contiguous()


def nf4_dequantize_triton(packed: Tensor, state: NF4State) -> Tensor:
    """One launch over the packed bytes; a nested absmax (n/blocksize floats) is undone by torch first."""
    if not HAS_TRITON:
        raise RuntimeError("nf4_dequantize_triton: triton is not installed")
    _check_dequantize_args(packed, state)
    flat, absmax, code, nested = launch_args(packed, state, packed.device)
    return dequantize_raw(flat, absmax, code, state.shape, state.dtype, state.blocksize, nested)


def nf4_dequantize(packed: Tensor, state: NF4State) -> Tensor:
    if use_triton(packed):
        return nf4_dequantize_triton(packed, state)
    return nf4_dequantize_reference(packed, state)


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes interop: use a Linear4bit's packed weight as it is.
# ---------------------------------------------------------------------------------------------------------------
def nf4_state_from_bnb(quant_state) -> NF4State:
    """Our state from a bitsandbytes `QuantState` (tensors shared, not copied)."""
    qt = quant_state.quant_type
    _code4(qt)
    code = quant_state.code if quant_state.code is not None else _code4(qt).to(quant_state.absmax.device)
    if quant_state.nested:
        s2 = quant_state.state2
        return NF4State(quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize, qt, code,
                        offset=quant_state.offset, nested_absmax=s2.absmax, nested_code=s2.code,
                        nested_blocksize=s2.blocksize)
    return NF4State(quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize, qt, code)


def nf4_from_bnb(weight) -> tuple[Tensor, NF4State]:
    """(packed uint8, state) from a bitsandbytes `Params4bit` or `Linear4bit` (no re-quantization)."""
    if isinstance(weight, torch.nn.Module):
        weight = weight.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("nf4_from_bnb: expected a quantized bitsandbytes Params4bit / Linear4bit (no quant_state "
                         "found; bnb quantizes a Linear4bit when it is moved to a device)")
    data = weight.data if isinstance(weight, torch.Tensor) else weight
    if data.dtype != torch.uint8:  # quant_storage other than uint8: same bytes
        data = data.reshape(-1).view(torch.uint8).unsqueeze(1)
    return data, nf4_state_from_bnb(qs)

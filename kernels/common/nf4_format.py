"""The NF4 (and FP4) 4-bit format of bitsandbytes, bit for bit: codebooks, `NF4State`, checks, bnb interop.

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

The ops live in nf4_quantize.py and nf4_dequantize.py; nf4_linear, qlora_linear and dora_norm read this format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Quantiles of N(0, 1) normalised to [-1, 1] (Dettmers et al., QLoRA), as bitsandbytes lists them, sorted.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# bnb's FP4 (e2m1 with its own bias), in bnb's code order, scaled by its largest magnitude (12).
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0


def code4(quant_type: str) -> Tensor:
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
            self.code = code4(self.quant_type).to(self.absmax.device)
        self.shape = torch.Size(self.shape)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def to(self, device) -> "NF4State":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4State(mv(self.absmax), self.shape, self.dtype, self.blocksize, self.quant_type, mv(self.code),
                        mv(self.offset), mv(self.nested_absmax), mv(self.nested_code), self.nested_blocksize)


def check_nf4_args(packed: Tensor, state: NF4State) -> None:
    """A packed weight and its state that fit each other (the messages name nf4_dequantize: every op reads
    the weight the way it does)."""
    code4(state.quant_type)
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_dequantize: blocksize must be one of {BLOCKSIZES}, got {state.blocksize}")
    if state.dtype not in DTYPES:
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


def absmax_f32(state: NF4State) -> Tensor:
    """float32 absmax per block, undoing double quantization as bnb does (code2[q] * absmax2, then + offset)."""
    if not state.nested:
        return state.absmax.float()
    nested = (state.nested_absmax.float(), state.nested_code.float(), state.offset.float(), state.nested_blocksize)
    return decode_absmax(state.absmax.reshape(-1), nested)


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


def nf4_state_from_bnb(quant_state) -> NF4State:
    """Our state from a bitsandbytes `QuantState` (tensors shared, not copied)."""
    qt = quant_state.quant_type
    code4(qt)
    code = quant_state.code if quant_state.code is not None else code4(qt).to(quant_state.absmax.device)
    if quant_state.nested:
        s2 = quant_state.state2
        return NF4State(quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize, qt, code,
                        offset=quant_state.offset, nested_absmax=s2.absmax, nested_code=s2.code,
                        nested_blocksize=s2.blocksize)
    return NF4State(quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize, qt, code)


def code_bytes(packed: Tensor) -> Tensor:
    """The packed codes as [bytes, 1] uint8. bitsandbytes' quant_storage (bnb_4bit_quant_storage) may hold the same
    bytes in another dtype, e.g. bf16 or float32 for FSDP; those are read as their bytes, nothing is converted."""
    if packed.dtype == torch.uint8:
        return packed
    return packed.contiguous().reshape(-1).view(torch.uint8).unsqueeze(1)


def nf4_from_bnb(weight) -> tuple[Tensor, NF4State]:
    """(packed uint8, state) from a bitsandbytes `Params4bit` or `Linear4bit` (no re-quantization)."""
    if isinstance(weight, torch.nn.Module):
        weight = weight.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("nf4_from_bnb: expected a quantized bitsandbytes Params4bit / Linear4bit (no quant_state "
                         "found; bnb quantizes a Linear4bit when it is moved to a device)")
    data = weight.data if isinstance(weight, torch.Tensor) else weight
    return code_bytes(data), nf4_state_from_bnb(qs)

"""Small host-side helpers every launcher shares: block-size arithmetic, the SM count, float64 scalars as fp32
pairs, and the accumulator dtype of the LoRA matmuls."""
from __future__ import annotations

import functools
import struct
from typing import Optional

import torch
from torch import Tensor


def np2(n: int) -> int:
    """The next power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: a small GPU's count, so that decode shapes take the split-K paths under test too.
    return 16


@functools.lru_cache(maxsize=1024)
def hi_lo(v: float) -> tuple[float, float]:
    """v as fp32 + fp32: Triton passes float arguments as fp32, and hi + lo added in float64 keeps v exact."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def row_strides(t: Tensor) -> Optional[tuple[int, int]]:
    """The (row, column) strides of t seen as [rows, last dim] without a copy, or None when its leading dims do not
    collapse into one stride (rows2d then copies)."""
    if t.dim() == 2:
        return t.stride()
    if t.is_contiguous():
        return t.shape[-1], 1
    *sizes, _ = t.shape
    *strides, col = t.stride()
    row = outer = None
    for size, stride in zip(reversed(sizes), reversed(strides)):  # innermost leading dim first
        if size == 1:
            continue  # any stride: never stepped over
        if row is None:
            row = stride
        elif stride != outer:
            return None
        outer = stride * size
    return (row if row is not None else t.shape[-1] * col), col


def rows2d(t: Tensor) -> Tensor:
    """t as [rows, last dim] (t itself when 2-D); unlike reshape(-1, d) it also works when d is 0."""
    if t.dim() == 2:
        return t
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def z_dtype(*ts: Tensor) -> torch.dtype:
    """The LoRA intermediate z = x·Aᵀ is float32 (float64 for float64 inputs) whatever the adapter dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def unrows(t: Tensor, lead: torch.Size) -> Tensor:
    """rows2d undone: t [rows, d] as [*lead, d] (t itself when lead is one dim)."""
    return t if len(lead) == 1 else t.view(*lead, t.shape[-1])


def unrows_owned(t: Tensor, lead: torch.Size) -> Tensor:
    """unrows for a fresh tensor a custom autograd Function returns and does not save: not a view in autograd's
    eyes (aten._unsafe_view, as torch's matmul returns its folded result), so that callers may modify it in place,
    as models do with a layer's output; a view made inside a Function could not be."""
    return t if len(lead) == 1 else torch.ops.aten._unsafe_view(t, (*lead, t.shape[-1]))

"""Which dtype the LoRA matmuls of every op meet in (the `DOT` constexpr of their kernels), and at what precision.

- float64 stays float64, so tests against the reference can be exact.
- Under the interpreter: float32, because its tl.dot garbles bfloat16 operands (triton-lang/triton#11584).
- 16-bit activations with float32 adapters: the 16-bit type, on the tensor cores, with float32 accumulation
  (DESIGN.md's numerics): float32 FMA dots cost the LoRA share 2-3x on Hopper (bench/results/). The setting
  lora_dot="fp32" (PEFT_FAST_LORA_DOT=fp32) keeps float32.
"""
from __future__ import annotations

import torch

from . import settings

DOT_NATIVE, DOT_F32, DOT_F64, DOT_BF16, DOT_F16 = 0, 1, 2, 3, 4


def dot_mode(a: torch.dtype, b: torch.dtype, out: torch.dtype) -> int:
    if torch.float64 in (a, b):
        return DOT_F64
    s = settings.current()
    if s.interpret:
        return DOT_F32
    if a == b and a != torch.float32:
        return DOT_NATIVE
    half = next((t for t in (a, b, out) if t in (torch.bfloat16, torch.float16)), None)
    if half is not None and s.lora_dot == "half":
        return DOT_BF16 if half == torch.bfloat16 else DOT_F16
    return DOT_F32


def half_dots(x_dtype: torch.dtype) -> bool:
    """Activations of this dtype meet the adapters in 16 bits on the Triton path (what stacks may be stored in)."""
    return x_dtype in (torch.bfloat16, torch.float16) and settings.current().lora_dot == "half"


def precision(dot: int) -> str:
    """float32 dots follow torch's matmul precision setting: "highest" (the default) matches cuBLAS and PEFT."""
    return "tf32" if dot == DOT_F32 and torch.get_float32_matmul_precision() != "highest" else "ieee"

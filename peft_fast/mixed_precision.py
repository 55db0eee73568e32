"""PEFT's `cast_mixed_precision_params`: a model's frozen parameters in a 16-bit dtype and its trainable ones in
float32, for automatic mixed-precision training that keeps the adapters' updates exact."""
from __future__ import annotations

import torch
import torch.nn as nn

from .bases.nf4_experts import is_nf4_experts, stack_codes
from .bases.nf4_linear import NF4Linear
from .tuners.base_layer import TunerLayer


def _packed_codes(module: nn.Module) -> set[str]:
    """Names of `module`'s parameters that hold packed 4-bit codes (in whatever dtype they are stored)."""
    if isinstance(module, NF4Linear):
        return {"weight"}
    if is_nf4_experts(module):
        return {stack_codes(n) for n in module._nf4_names}
    return set()


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every frozen floating-point parameter of `model` to `dtype` (torch.float16 or torch.bfloat16) and every
    trainable one to float32, in place, as PEFT's function does. Unlike PEFT's, packed 4-bit codes (peft_fast's
    NF4 layers, bitsandbytes' Params4bit, also when stored in a float type) and integer parameters keep their values:
    a cast would change their bytes. The layers' derived caches are dropped, as after `model.to(dtype)`."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"cast_mixed_precision_params: dtype must be a floating-point torch.dtype (torch.float16 or "
                         f"torch.bfloat16), got {dtype!r}.")
    for module in model.modules():
        codes = _packed_codes(module)
        for name, p in module._parameters.items():
            if p is None or name in codes or not p.is_floating_point() or type(p).__name__ == "Params4bit":
                continue
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    for module in model.modules():
        if isinstance(module, TunerLayer):
            module.invalidate(base=True)

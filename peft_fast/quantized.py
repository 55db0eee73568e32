"""bitsandbytes 4-bit base layers (Linear4bit, nf4 or fp4) under a LoraLinear: when to fuse, and PEFT's 4-bit order.

bitsandbytes is never imported here: a 4-bit base is recognised by its class name and its weight's `quant_state`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .kernels import lora_linear, nf4_from_bnb, use_triton
from .kernels.nf4 import _check_dequantize_args
from .nf4_linear import NF4Linear


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit` (or LinearNF4 / LinearFP4, its subclasses)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_4bit_base(module: nn.Module) -> bool:
    """A 4-bit base layer: bitsandbytes' Linear4bit, or peft_fast's own NF4Linear (peft_fast.quantize)."""
    return isinstance(module, NF4Linear) or is_bnb_4bit(module)


def _cache_key(weight: torch.Tensor, qs) -> tuple:
    nested = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
    return (weight.data_ptr(), weight.device, weight.dtype, qs.absmax.data_ptr(),
            nested.absmax.data_ptr() if nested is not None else None)


def _converted(layer: nn.Module) -> tuple:
    """(packed, state) of the base layer's weight, cached on the LoraLinear; rebuilt when the weight's storage or its
    quant_state (the object, or its absmax tensors, which `QuantState.to` swaps in place) changes."""
    weight = layer.base_layer.weight
    qs = weight.quant_state
    key = _cache_key(weight, qs)
    cache = layer.__dict__.get("_nf4_cache")
    if cache is None or cache[0] is not qs or cache[1] != key:
        packed, state = nf4_from_bnb(weight)
        # Once, here: bitsandbytes may keep pieces of a quant state (the codebook, the nested offset) on the CPU,
        # which every call would otherwise copy to the device, waiting on it (seen as ~240 us per decode call
        # on an H200, against peft_fast.quantize's layers).
        cache = (qs, key, (packed, state.to(weight.device)))
        layer.__dict__["_nf4_cache"] = cache
    return cache[2]


def _compute_cast(compute_dtype: Optional[torch.dtype], x: torch.Tensor) -> Optional[torch.dtype]:
    """None: x runs as it is. A 16-bit dtype: the fused op runs in it and its output is cast back to x's dtype.

    QLoRA's usual recipe (prepare_model_for_kbit_training upcasts the norms) feeds float32 activations to layers
    that compute in bf16. bitsandbytes casts x for the base matmul and PEFT runs the LoRA delta in float32 beside
    it. On the Triton path the whole op runs in the compute dtype instead, LoRA included (float32 accumulation;
    the delta is rounded once to the 16-bit output, within its tolerance): one fused op rather than bnb's layer
    plus float32 LoRA matmuls without tensor cores. The CPU reference keeps PEFT's order exactly (returns "no")."""
    if compute_dtype is None or compute_dtype == x.dtype:
        return None
    if compute_dtype in (torch.float16, torch.bfloat16) and x.dtype == torch.float32 and use_triton(x):
        return compute_dtype
    return False


def fused_base(layer: nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """(packed, state, bias, cast) when `qlora_linear` computes what the 4-bit base layer would (with `cast` a
    16-bit dtype: on x cast to it, see _compute_cast); else None, and the caller runs base_layer(x) and adds the
    deltas in PEFT's 4-bit order (`add_deltas`)."""
    base = layer.base_layer
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    if isinstance(base, NF4Linear):
        cast = _compute_cast(base.compute_dtype, x)
        if cast is False or base.weight.device != x.device:
            return None
        return base.weight, base.quant_state, base.bias, cast
    if not is_bnb_4bit(base):
        return None
    qs = getattr(base.weight, "quant_state", None)  # None: not quantized yet, or lost (bnb recovers it itself)
    if qs is None or getattr(qs, "packing_format_for_cpu", False) or len(qs.shape) != 2:
        return None  # repacked for bnb's AVX512-BF16 CPU kernel: a layout of bnb's own, which bnb computes with
    if (x.device.type == "cpu" and getattr(base, "support_avx512bf16_for_cpu", False) and not base.training
            and not x.requires_grad and not use_triton(x)):
        return None  # bnb would repack the weight now and use that kernel: defer to it, as PEFT's layer does
    cast = _compute_cast(getattr(base, "compute_dtype", None), x)
    if cast is False or base.weight.device != x.device:
        return None
    packed, state = _converted(layer)
    return packed, state, base.bias, cast


def add_deltas(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, active: list[str]) -> torch.Tensor:
    """PEFT's `lora.bnb.Linear4bit.forward` after the base output: each adapter's delta, in the adapter dtype, is
    cast to the base output's dtype and then added (x keeps its last cast, as PEFT reassigns it)."""
    out_dtype = result.dtype
    for name in active:
        a, b, s, p, b_bias = layer._adapter_args(name)
        x = x.to(a.dtype)
        result = result + lora_linear(x, None, None, a, b, s, p, b_bias).to(out_dtype)
    return result


def check_4bit_base(module: nn.Module, name: str) -> None:
    """Refuse, naming the layer, a 4-bit base whose quant state peft_fast cannot use or that does not fit it."""
    if not is_4bit_base(module):
        return
    if isinstance(module, NF4Linear):
        packed, state = module.weight, module.quant_state
    else:
        qs = getattr(module.weight, "quant_state", None)
        if qs is None:
            return  # not quantized yet (bitsandbytes quantizes on the move to a device): checked when it runs
        qt = getattr(qs, "quant_type", None)
        if qt not in ("nf4", "fp4"):
            raise ValueError(f"Target module {name}: unsupported 4-bit quant type {qt!r}; peft_fast runs "
                             "bitsandbytes' 'nf4' and 'fp4' weights. Re-quantize with bnb_4bit_quant_type='nf4', or "
                             "exclude this module.")
        if getattr(qs, "packing_format_for_cpu", False):
            return  # repacked by bitsandbytes for its CPU kernel: bitsandbytes runs it (see fused_base)
        packed, state = nf4_from_bnb(module.weight)
    want = (module.out_features, module.in_features)
    problem = None
    if tuple(state.shape) != want:
        problem = f"its quant_state describes a weight of shape {tuple(state.shape)}, the layer is {want} (out, in)"
    else:
        try:
            _check_dequantize_args(packed, state)
        except ValueError as e:
            problem = str(e).removeprefix("nf4_dequantize: ")
    if problem:
        raise ValueError(f"Target module {name} ({type(module).__name__}): mismatched 4-bit quant_state: {problem}. "
                         "The weight and its quant state must come from the same quantization; reload the "
                         "checkpoint, or exclude this module.")

"""The fused decoder: RMSNorm, the rotary embedding, the gated MLP's activation and the causal-LM loss (without its
logits) of Llama, Mistral, Qwen2/3, Gemma 1/2/3, Mixtral and Qwen2/3-MoE decoders run as fused kernels, through
Liger-Kernel or torch.compile. Switched on by ``fused=`` of ``peft_fast.patch`` / ``get_peft_model``, or by
``fuse(model)`` on any model (with or without adapters); ``unfuse(model)`` reverts it.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Optional, Union

import torch
from torch import nn

from peft_fast.fused.ops import BACKENDS, liger_available, resolve
from peft_fast.fused.patching import FAMILIES, fuse_module, part_of, unfuse_module

__all__ = ["BACKENDS", "FAMILIES", "fuse", "fused_parts", "liger_available", "resolve_backend", "unfuse"]


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_backend(model: nn.Module, fused: Union[str, bool, None]) -> Optional[str]:
    """The backend `fused=` names for this model (None: off). Raises, naming the fix, for a backend it cannot use."""
    return resolve(fused, _device(model))


def fuse(model: nn.Module, backend: Union[str, bool, None] = "auto") -> nn.Module:
    """Run the decoder parts of `model` that peft_fast knows on fused kernels, in place; returns the model.

    backend: "liger" (Liger-Kernel, CUDA), "compile" (torch.compile; CPU or GPU), "auto"/True (Liger on CUDA when
    installed, else compile), None/False (unfuse). A model with no known decoder part is left as it is, with a warning.
    """
    name = resolve_backend(model, backend)
    unfuse(model)
    if name is None:
        return model
    parts = Counter(part for module in model.modules() if (part := fuse_module(module, name)) is not None)
    if not parts:
        kinds = sorted({type(m).__name__ for m in model.modules() if m is not model})[:6]
        warnings.warn(f"fused={backend!r}: peft_fast fuses the decoders of {', '.join(FAMILIES)} models, and "
                      f"{type(model).__name__} (with {', '.join(kinds)}, ...) has none of their modules; it runs "
                      "unfused.", stacklevel=2)
        return model
    if "loss" not in parts:
        warnings.warn(f"fused={backend!r}: {type(model).__name__} has no causal-LM head that peft_fast knows, so its "
                      "loss is computed unfused (with the full logits).", stacklevel=2)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Give every fused module its own class back; returns the model."""
    for module in model.modules():
        unfuse_module(module)
    return model


def fused_parts(model: nn.Module) -> Counter:
    """How many modules of each part (rms_norm, rope, glu, loss) run fused."""
    return Counter(part for m in model.modules() if (part := part_of(m)) is not None)

"""The base layers LoHa and LoKr adapt (PEFT's layers_mapping: Conv2d, Conv1d, Linear) and their views: the shared
linear views, and the shared ConvView (peft_fast/bases/conv.py), which the default `view_for` of a tuner layer
leaves out."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ...bases import BaseView, ConvView, is_4bit, view_of

# PEFT's order: the first type a module is an instance of names its layer ("Conv2d", "Conv1d", "Linear").
KINDS: tuple[tuple[type, str], ...] = ((nn.Conv2d, "Conv2d"), (nn.Conv1d, "Conv1d"), (nn.Linear, "Linear"))


def base_kind(module: nn.Module, tuner: str, key: Optional[str] = None) -> str:
    """"Linear", "Conv1d" or "Conv2d" for a base layer the tuner can adapt; otherwise a TypeError saying why."""
    where = f"Target module {key} " if key else "Target module "
    if is_4bit(module):
        # PEFT 0.21.2 accepts bitsandbytes' Linear4bit (an nn.Linear), sizes the adapter from the packed 4-bit
        # weight and then fails in forward: refuse before anything changes.
        raise TypeError(f"{where}({type(module).__name__}) is a 4-bit layer: {tuner} adapters over 4-bit base layers "
                        "are not supported (PEFT 0.21.2 cannot run them either). Load the base model in 16 or 32 bit, "
                        "or leave this module out of target_modules.")
    for cls, kind in KINDS:
        if isinstance(module, cls):
            weight = getattr(module, "weight", None)
            if weight is None or not weight.dtype.is_floating_point:
                raise TypeError(f"{where}({type(module).__name__}) has no floating-point weight; {tuner} adds a "
                                "delta to the base weight and needs one.")
            return kind
    raise TypeError(f"{where}of type {type(module)} not supported, currently only adapters for Conv2d, Conv1d, "
                    f"Linear are supported (PEFT's {tuner} layers). transformers' Conv1D (GPT-2) is not among them, "
                    "in PEFT either: target other modules, or use LoRA there.")


def view_for(module: nn.Module, tuner: str, key: Optional[str] = None) -> BaseView:
    """The view of a base layer the tuner can adapt (the shared ConvView for convolutions); otherwise a TypeError."""
    base_kind(module, tuner, key)
    return ConvView(module) if ConvView.accepts(module) else view_of(module)

"""The base layers LoHa and LoKr adapt (PEFT's layers_mapping: Conv2d, Conv1d, Linear) and a base view for
convolutions, so the shared merge bookkeeping reads and writes a convolution's weight as it does a linear one's.

peft_fast's shared views (peft_fast/bases) cover linear bases only; `view_for` adds torch's Conv1d and Conv2d for
these tuners.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ...bases import BaseView, is_4bit, view_of
from ...bases.view import has_hooks

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


class ConvView(BaseView):
    """torch.nn.Conv1d / Conv2d: weight [out, in / groups, *kernel]."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._plain = type(module) in (nn.Conv1d, nn.Conv2d)

    @property
    def in_features(self) -> int:
        return self.module.in_channels

    @property
    def out_features(self) -> int:
        return self.module.out_channels

    def fused_conv(self):
        """(weight, bias) when the module's forward is exactly F.conv{1,2}d with its settings (a plain module, zero
        padding, no hooks), so that a convolution with another weight may replace it; else None."""
        m = self.module
        if not self._plain or has_hooks(m) or m.padding_mode != "zeros":
            return None
        return m.weight, m.bias

    def supports_norms(self) -> bool:
        return False

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))


def view_for(module: nn.Module) -> BaseView:
    return ConvView(module) if ConvView.accepts(module) else view_of(module)

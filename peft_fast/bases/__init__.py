"""The base layers an adapter can sit on, and one view over each (view.py explains the interface).

`view_of(module)` walks the dispatcher list below; the first view that accepts the module wraps it. Adding a base
kind (say, an 8-bit layer) is one view class and one entry here.
"""
from __future__ import annotations

import torch.nn as nn

from .bnb4 import Bnb4View, is_bnb_4bit
from .nf4 import NF4View
from .nf4_linear import NF4Linear
from .view import BaseView, DenseView, conv1d_type

VIEWS: list[type[BaseView]] = [NF4View, Bnb4View, DenseView]  # most specific first (Linear4bit is an nn.Linear)


def view_of(module: nn.Module) -> BaseView:
    for view in VIEWS:
        if view.accepts(module):
            return view(module)
    raise TypeError(f"{type(module).__name__} is not a supported base layer")


def supported(module: nn.Module) -> bool:
    return any(view.accepts(module) for view in VIEWS)


def is_4bit(module: nn.Module) -> bool:
    """A 4-bit base layer: bitsandbytes' Linear4bit, or peft_fast's own NF4Linear (peft_fast.quantize)."""
    return isinstance(module, NF4Linear) or is_bnb_4bit(module)


def linear_types() -> tuple[type, ...]:
    """Module types that count as linear layers for target matching ("all-linear")."""
    conv1d = conv1d_type()
    return (nn.Linear, NF4Linear) + ((conv1d,) if conv1d is not None else ())


__all__ = ["BaseView", "Bnb4View", "DenseView", "NF4View", "NF4Linear", "VIEWS", "is_4bit", "is_bnb_4bit",
           "linear_types", "supported", "view_of"]

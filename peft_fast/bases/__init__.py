"""The base layers an adapter can sit on, and one view over each (view.py explains the interface).

`view_of(module)` walks the dispatcher list below; the first view that accepts the module wraps it. Adding a base
kind (say, an 8-bit layer) is one view class and one entry here. Views of modules that only some tuners adapt
(`ConvView`, conv.py; `EmbeddingView`, embedding.py) are not in the list: those tuners return them from their
layer's `view_for`.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .bnb4 import Bnb4View, is_bnb_4bit
from .bnb8 import Bnb8View
from .conv import ConvView
from .embedding import EmbeddingView
from .nf4 import NF4View
from .nf4_linear import NF4Linear
from .view import BaseView, Conv1D, DenseView

# most specific first (Linear4bit and Linear8bitLt are nn.Linear)
VIEWS: list[type[BaseView]] = [NF4View, Bnb4View, Bnb8View, DenseView]


def view_of(module: nn.Module) -> BaseView:
    for view in VIEWS:
        if view.accepts(module):
            return view(module)
    raise TypeError(f"{type(module).__name__} is not a supported base layer")


def supported(module: nn.Module) -> bool:
    return any(view.accepts(module) for view in VIEWS)


def linear_view(module: nn.Module, key: Optional[str] = None) -> BaseView:
    """The shared view of `module`, or a ValueError naming target `key` when it is no base in the list (what a
    tuner layer's `view_for` does unless the tuner adapts more kinds of modules)."""
    if not supported(module):
        raise ValueError(
            f"Target module {key} ({type(module).__name__}) is not supported. peft_fast adapts torch.nn.Linear and "
            "transformers Conv1D layers; narrow target_modules (or use exclude_modules) to skip it."
        )
    return view_of(module)


def is_4bit(module: nn.Module) -> bool:
    """A 4-bit base layer: bitsandbytes' Linear4bit, or peft_fast's own NF4Linear (peft_fast.quantize)."""
    return isinstance(module, NF4Linear) or is_bnb_4bit(module)


def linear_types() -> tuple[type, ...]:
    """Module types that count as linear layers for target matching ("all-linear")."""
    return (nn.Linear, NF4Linear, Conv1D)


__all__ = ["BaseView", "Bnb4View", "Bnb8View", "ConvView", "DenseView", "EmbeddingView", "NF4View", "NF4Linear",
           "VIEWS", "is_4bit", "is_bnb_4bit", "linear_types", "linear_view", "supported", "view_of"]

"""Which LoRA layer class adapts a targeted base module (PEFT's dispatcher list for lora.Linear, lora.Embedding,
lora.Conv2d, ...): the first entry that adapts the module wins, in PEFT's order; everything else is a linear layer's
or refused, naming the target."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...bases import supported
from .conv import LoraConv1d, LoraConv2d, LoraConv3d
from .embedding import LoraEmbedding
from .layer import LoraLinear

LAYERS = (LoraEmbedding, LoraConv2d, LoraConv3d, LoraConv1d)


def layer_for(module: nn.Module, key: str) -> tuple[type, Any]:
    """(layer class, base view) for `module`, or a ValueError naming target `key`."""
    for cls in LAYERS:
        if cls.adapts(module):
            return cls, cls.view_for(module, key)
    if not supported(module):
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # Hugging Face PEFT's own layer
            raise ValueError(f"Target module {key} is a Hugging Face PEFT layer ({type(module).__name__}): this "
                             "model already holds PEFT adapters (transformers loads them itself from a folder with an "
                             "adapter_config.json). Run them on peft_fast's kernels with peft_fast.patch(model), or "
                             "load the base model without its adapter.")
        raise ValueError(f"Target module {key} ({type(module).__name__}) is not supported. Currently, peft_fast's LoRA "
                         "adapts `torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, "
                         "`torch.nn.Conv3d`, `transformers.pytorch_utils.Conv1D` and 4-bit linear layers; narrow "
                         "target_modules (or use exclude_modules) to skip it.")
    return LoraLinear, LoraLinear.view_for(module, key)

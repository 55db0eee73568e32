"""PEFT's state-dict functions for a PeftModel (or the adapted model inside it): adapter tensors under PEFT's file
keys, and loading such tensors into an existing adapter."""
from __future__ import annotations

import torch
import torch.nn as nn

from .tuners.base_model import TunerModel
from .tuners.file_keys import adapter_tensors, load_adapter_tensors


def _unwrap(model: nn.Module) -> tuple[nn.Module, dict]:
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, TunerModel):  # a PeftModel
        return tuner.model, tuner.peft_config
    return model, {}


def get_peft_model_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """File-ready tensors of one adapter (keys get PEFT's ``base_model.model.`` prefix)."""
    inner, configs = _unwrap(model)
    return adapter_tensors(inner, adapter_name, configs)


def set_peft_model_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Copy file-format tensors into an existing adapter's parameters."""
    load_adapter_tensors(_unwrap(model)[0], tensors, adapter_name)

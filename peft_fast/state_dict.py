"""PEFT's state-dict functions for a PeftModel (or the adapted model inside it): adapter tensors under PEFT's file
keys, and loading such tensors into an existing adapter."""
from __future__ import annotations

import torch
import torch.nn as nn

from .tuners.base_model import TunerModel
from .tuners.file_keys import PREFIX, adapter_tensors, load_adapter_tensors


def _unwrap(model: nn.Module) -> tuple[nn.Module, dict, bool]:
    """(the adapted model, its configs, whether it is wrapped in a PeftModel)."""
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, TunerModel):  # a PeftModel
        return tuner.model, tuner.peft_config, True
    configs = model.__dict__.get("peft_config")  # set by inject_adapter_in_model
    return model, configs if isinstance(configs, dict) else {}, False


def get_peft_model_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """File-ready tensors of one adapter. Keys of a PeftModel get PEFT's ``base_model.model.`` prefix; those of a
    model adapted by inject_adapter_in_model are its own module names, as PEFT writes them."""
    inner, configs, wrapped = _unwrap(model)
    tensors = adapter_tensors(inner, adapter_name, configs)
    return tensors if wrapped else {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def set_peft_model_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Copy file-format tensors into an existing adapter's parameters."""
    load_adapter_tensors(_unwrap(model)[0], tensors, adapter_name)

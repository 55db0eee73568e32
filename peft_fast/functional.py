"""PEFT's functions for working without a PeftModel wrapper: `inject_adapter_in_model` (adapter layers put into a
plain model), `get_peft_config` (a config from a dict) and `load_peft_weights` (an adapter file's tensors)."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from . import files
from .config import PeftConfig, as_config
from .loading import remap_keys
from .names import check_adapter_name
from .tuners import registry
from .tuners.file_keys import PREFIX


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config class its `peft_type` names, built from adapter_config.json's contents."""
    return PeftConfig.from_dict(config_dict)


def inject_adapter_in_model(peft_config: Any, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """Put adapter layers into `model` in place and return it (no PeftModel around it; base weights frozen,
    `model.peft_config` holds the config). With `state_dict`, the adapted modules are the ones its keys name, not
    the config's targets (as PEFT, which warns where the two differ); its values are not loaded: use
    `set_peft_model_state_dict(model, state_dict)`."""
    check_adapter_name(adapter_name)
    config = copy.deepcopy(as_config(peft_config))
    model_cls = registry.get(config.peft_type).model_cls
    tuner = model_cls(model, config, adapter_name, state_dict=state_dict)
    model.peft_config = tuner.peft_config
    return model


def targets_from(state_dict: dict, config: PeftConfig, prefix: str) -> PeftConfig:
    names = sorted({k.removeprefix(PREFIX).rsplit("." + prefix, 1)[0] for k in state_dict if "." + prefix in k})
    if not names:
        raise ValueError(f"inject_adapter_in_model: no key of state_dict names an adapter module (keys holding "
                         f"'.{prefix}'), e.g. {next(iter(state_dict), None)!r}; pass the adapter's tensors.")
    wanted = config.target_modules
    if wanted is not None and wanted != "all-linear":
        listed = {wanted} if isinstance(wanted, str) else set(wanted)
        extra = sorted(t for t in listed if not any(n == t or n.endswith("." + t) for n in names))
        if extra:
            warnings.warn(f"inject_adapter_in_model: the config also targets {extra}, which state_dict holds no "
                          "tensors for; the modules state_dict names are adapted, as PEFT does.", RuntimeWarning,
                          stacklevel=3)
    # Full names match only themselves (a target matches a module name equal to it or ending in "." + it).
    config.target_modules, config.layers_to_transform, config.layers_pattern = set(names), None, None
    return config


def load_peft_weights(model_id: str, device: Optional[str] = None, key_mapping: Optional[dict[str, str]] = None,
                      **hf_hub_download_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved at `model_id` (a folder or a Hub repo), under the file's keys, on `device`
    (the CPU by default). `key_mapping`: regex -> replacement, applied to each key without its
    `base_model.model.` prefix, the first pattern that matches wins (PEFT's transformers key mapping)."""
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    hub = {k: v for k, v in hf_hub_download_kwargs.items() if k != "user_agent"}
    tensors = files.load_tensors(files.find_weights(model_id, subfolder=subfolder, **hub))
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return remap_keys(tensors, key_mapping, model_id)

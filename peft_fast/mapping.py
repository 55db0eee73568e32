"""The entry points that make a model an adapter model: ``get_peft_model`` (PEFT's, in its ``peft.mapping``) and
``patch``, which also speeds up a Hugging Face PEFT model in place."""
from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch.nn as nn

from .config import as_config
from .fused import fuse, resolve_backend
from .peft_interop import patch_peft_model, peft_layer_names
from .peft_model import TASK_MODELS, PeftModel


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False, fused: Union[str, bool, None] = None) -> PeftModel:
    """Wrap ``model`` with a new adapter of the config's type (PEFT's ``get_peft_model``).

    ``fused``: also run the decoder's RMSNorm, rotary embedding, gated MLP and causal-LM loss on fused kernels
    (``peft_fast.fuse``): "liger" (Liger-Kernel, CUDA), "compile" (torch.compile), True/"auto" (Liger on CUDA when
    installed, else compile); off by default. A backend that cannot run is refused before the model changes."""
    if mixed:
        raise NotImplementedError("mixed=True (PeftMixedModel) is not supported by peft_fast.")
    if isinstance(model, PeftModel):
        raise TypeError("The model is already a PeftModel: use model.add_adapter(name, config) to add an adapter.")
    config = as_config(peft_config)
    if revision is not None:
        config.revision = revision
    # As PEFT: the model's own name wins (models built from a config have "", which is no Hub id).
    old_name, new_name = config.base_model_name_or_path, model.__dict__.get("name_or_path", None) or None
    config.base_model_name_or_path = new_name
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'.")
    backend = resolve_backend(model, fused)
    cls = TASK_MODELS.get(config.task_type, PeftModel)
    wrapped = cls(model, config, adapter_name, autocast_adapter_dtype)
    if backend is not None:
        fuse(model, backend)
    return wrapped


def patch(model: nn.Module, config: Any = None, adapter_name: str = "default", **kwargs: Any) -> nn.Module:
    """``patch(model, config)``: turn ``model`` into an adapter model in place (target layers become peft_fast
    adapter layers), as ``get_peft_model``. ``patch(peft_model)``: run a Hugging Face PEFT model's adapter layers on
    peft_fast's kernels in place, keeping PEFT's classes, parameters and files (``unpatch`` reverts it)."""
    if config is None:
        if isinstance(model, PeftModel):
            raise TypeError("This model is a peft_fast PeftModel already: it runs on peft_fast's kernels.")
        if not peft_layer_names(model):
            raise TypeError(f"patch(model) without a config speeds up a Hugging Face PEFT model, and this "
                            f"{type(model).__name__} holds no PEFT adapter layers: to add adapters, pass a config, "
                            "e.g. patch(model, LoraConfig(...)).")
        fused = kwargs.pop("fused", None)
        if kwargs:
            raise TypeError(f"patch(peft_model) takes only fused=; got {sorted(kwargs)}.")
        backend = resolve_backend(model, fused)
        patch_peft_model(model)
        return fuse(model, backend) if backend is not None else model
    return get_peft_model(model, config, adapter_name, **kwargs)

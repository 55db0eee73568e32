"""Adapter state dicts with PEFT's file keys: the adapter name is stripped on save and put back on load."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .config import LoraConfig
from .injection import Plan
from .layer import LoraLinear
from .modules_to_save import ModulesToSaveWrapper

PREFIX = "base_model.model."


def get_peft_model_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """File-ready tensors of one adapter. ``model`` is the wrapped model (keys get PEFT's ``base_model.model.``)."""
    from .peft_model import PeftModel

    model_peft_config = None
    if isinstance(model, PeftModel):
        model_peft_config = model.peft_config
        config = model.peft_config[adapter_name]
        model = model.base_model.model
    else:
        config = None
    out: dict[str, torch.Tensor] = {}
    for key, m in model.named_modules():
        if isinstance(m, LoraLinear):
            if adapter_name in m.lora_A:
                out[f"{PREFIX}{key}.lora_A.weight"] = m.lora_A[adapter_name].weight
                out[f"{PREFIX}{key}.lora_B.weight"] = m.lora_B[adapter_name].weight
                if m.lora_B[adapter_name].bias is not None:
                    out[f"{PREFIX}{key}.lora_B.bias"] = m.lora_B[adapter_name].bias
                if adapter_name in m.lora_magnitude_vector:  # PEFT's file key has no ".weight" (its older layout)
                    out[f"{PREFIX}{key}.lora_magnitude_vector"] = m.lora_magnitude_vector[adapter_name].weight
            # PEFT saves the base bias of every LoRA layer with a "lora_only" adapter, targeted by it or not.
            if config is not None and config.bias == "lora_only" and m.base_layer.bias is not None:
                out[f"{PREFIX}{key}.base_layer.bias"] = m.base_layer.bias
        elif isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
            for k, v in m.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{key}.{k}"] = v
    if config is not None and config.bias == "all":
        # PEFT: every bias of the model minus other adapters' ones, this adapter's name dropped from the key.
        others = [n for n in (model_peft_config or {}) if n != adapter_name]
        for k, v in model.state_dict().items():
            parts = k.split(".")
            if parts[-1] != "bias" or any(o in parts for o in others):
                continue
            key = ".".join(p for p in parts if p != adapter_name)
            out.setdefault(f"{PREFIX}{key}", v)
    return {k: v.detach() for k, v in out.items()}


def expected_file_tensors(model: nn.Module, plan: Plan) -> dict[str, tuple[int, ...]]:
    """File key -> shape that an adapter with this plan must provide (before the model is touched)."""
    config: LoraConfig = plan.config
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan.targets:
        shapes[f"{PREFIX}{t.key}.lora_A.weight"] = (t.r, t.in_features)
        shapes[f"{PREFIX}{t.key}.lora_B.weight"] = (t.out_features, t.r)
        if config.lora_bias:
            shapes[f"{PREFIX}{t.key}.lora_B.bias"] = (t.out_features,)
        if config.use_dora:
            shapes[f"{PREFIX}{t.key}.lora_magnitude_vector"] = (t.out_features,)
    for key in plan.save_modules:
        module = model.get_submodule(key)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        for k, v in module.state_dict().items():
            shapes[f"{PREFIX}{key}.{k}"] = tuple(v.shape)
    return shapes


def check_file_tensors(tensors: dict[str, torch.Tensor], model: nn.Module, plan: Plan, source: str) -> None:
    """Raise a ValueError naming every problem, so nothing is loaded from a file that does not fit."""
    tensors = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in tensors.items()}
    expected = expected_file_tensors(model, plan)
    model_state = {_base_key(PREFIX + k): v for k, v in model.state_dict().items()}
    problems: list[str] = []
    unknown = [k for k in tensors if k not in expected and not ("bias" in k and _base_key(k) in model_state)]
    if unknown:
        problems.append(f"{len(unknown)} key(s) match no adapter layer of this model, e.g. {unknown[:3]}")
    missing = [k for k in expected if k not in tensors]
    if missing:
        problems.append(f"{len(missing)} adapter key(s) are missing, e.g. {missing[:3]}")
    for k, shape in expected.items():
        if k in tensors and tuple(tensors[k].shape) != shape:
            problems.append(f"{k} has shape {tuple(tensors[k].shape)} but this model needs {shape}")
    for k, v in tensors.items():
        if k not in expected and "bias" in k and _base_key(k) in model_state:
            if tuple(model_state[_base_key(k)].shape) != tuple(v.shape):
                problems.append(f"{k} has shape {tuple(v.shape)} but the model's is {tuple(model_state[_base_key(k)].shape)}")
    if problems:
        raise ValueError(f"Adapter weights in {source} do not fit this model (nothing was loaded): "
                         + "; ".join(problems[:6]) + ". Was the adapter trained on a different base model or config?")


def _base_key(key: str) -> str:
    """The key of a base-model tensor whether or not its module is wrapped (LoRA layer or modules_to_save, whose
    copies PEFT saves as ``<path>.modules_to_save.bias`` under bias="all")."""
    key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
    return re.sub(r"\.modules_to_save\.([^.]+\.)?(?=[^.]+$)", ".", key)


def set_peft_model_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Copy file-format tensors into an existing adapter's parameters (``model``: a PeftModel or the wrapped model)."""
    from .peft_model import PeftModel

    if isinstance(model, PeftModel):
        model = model.base_model.model
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    lora_layers = {k: m for k, m in model.named_modules() if isinstance(m, LoraLinear)}
    wrappers = {k: m for k, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    with torch.no_grad():
        for file_key, value in tensors.items():
            key = file_key[len(PREFIX):] if file_key.startswith(PREFIX) else file_key
            target = _resolve(key, adapter_name, lora_layers, wrappers)
            dest = params.get(target, buffers.get(target))
            if dest is None:  # a base bias saved from an unwrapped module, now under a LoRA layer (or vice versa)
                alt = target.replace(".base_layer.", ".") if ".base_layer." in target else \
                    target.rpartition(".")[0] + ".base_layer." + target.rpartition(".")[2]
                dest = params.get(alt, buffers.get(alt))
            if dest is None:
                raise ValueError(f"Adapter key {file_key} matches no parameter of the model (looked for {target}).")
            dest.copy_(value.to(dtype=dest.dtype, device=dest.device))


def _resolve(key: str, adapter_name: str, lora_layers: dict, wrappers: dict) -> str:
    if key.endswith(".lora_magnitude_vector"):  # PEFT's DoRA key, back to the parameter's name
        path = key[:-len(".lora_magnitude_vector")]
        if path in lora_layers:
            return f"{path}.lora_magnitude_vector.{adapter_name}.weight"
    for marker in (".lora_A.", ".lora_B."):
        if marker in key:
            path, _, rest = key.partition(marker)
            if path in lora_layers:
                return f"{path}{marker}{adapter_name}.{rest}"
    for path in wrappers:
        if key.startswith(f"{path}.original_module."):
            return key
        if key.startswith(f"{path}.modules_to_save."):
            return f"{path}.modules_to_save.{adapter_name}.{key[len(path) + 17:]}"
        if key.startswith(path + "."):
            return f"{path}.modules_to_save.{adapter_name}.{key[len(path) + 1:]}"
    return key

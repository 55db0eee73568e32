"""get_layer_status / get_model_status: PEFT's diagnostics of which adapters are where and in what state."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch.nn as nn

from .tuners.base_layer import TunerLayer
from .tuners.base_model import TunerModel
from .tuners.modules_to_save import ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular] = None


def _agree(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_parts(module: nn.Module):
    if isinstance(module, TunerLayer):
        return list(module.adapter_parts())
    return list(module.modules_to_save.items())


def _tuner(model: nn.Module):
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, TunerModel) else None


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    root = _tuner(model) or model
    out: list[TunerLayerStatus] = []
    for name, module in root.named_modules():
        if not isinstance(module, (TunerLayer, ModulesToSaveWrapper)):
            continue
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        devices: dict[str, set[str]] = collections.defaultdict(set)
        for key, sub in _adapter_parts(module):
            for p in (sub.parameters() if isinstance(sub, nn.Module) else [sub]):
                grads[key].append(p.requires_grad)
                devices[key].add(p.device.type)
        merged = module.merged_adapters if isinstance(module, TunerLayer) else []
        out.append(TunerLayerStatus(
            name=name,
            module_type=repr(module).partition("(")[0],
            enabled=not module.disable_adapters,
            active_adapters=module.active_adapters,
            merged_adapters=list(merged),
            requires_grad={k: _agree(v) for k, v in grads.items()},
            available_adapters=(module.available_adapters() if isinstance(module, TunerLayer)
                                else sorted(module.modules_to_save.keys())),
            devices={k: sorted(v) for k, v in devices.items()},
        ))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    tuner = _tuner(model)
    if tuner is not None:
        base_type = type(tuner.model).__name__
        adapter_type = type(tuner).__name__
        peft_types = {k: c.peft_type for k, c in tuner.peft_config.items()}
    else:
        base_type, adapter_type, peft_types = "other", "None", {}
    trainable, total = count_parameters(model)
    layers = get_layer_status(model)
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_all = sorted({a for s in layers for a in s.merged_adapters})
    merged: Union[list[str], Irregular] = merged_all
    if any(set(s.available_adapters) - set(s.merged_adapters) & set(merged_all) for s in layers):
        merged = "irregular"
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].update(v)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else ("irregular" if actives else []),
        merged_adapters=merged,
        requires_grad={k: _agree(v) for k, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
    )


def count_parameters(model: nn.Module, skip: frozenset = frozenset()) -> tuple[int, int]:
    """(trainable, total), counting 4-bit parameters at their unpacked size, as PEFT does for bitsandbytes' (so
    peft_fast.quantize's NF4Linear weights and 4-bit expert stacks count as bitsandbytes' layers would)."""
    from .bases.nf4_experts import code_parameters

    codes = code_parameters(model)
    trainable = total = 0
    for _, p in model.named_parameters():
        if id(p) in skip:
            continue
        n = p.numel()
        if p.__class__.__name__ == "Params4bit" or id(p) in codes:
            n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total

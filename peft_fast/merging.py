"""Merging adapters into base weights, PEFT's semantics, and all-or-nothing: every check runs before any weight
of any layer changes, so a refused merge leaves the model as it was."""
from __future__ import annotations

import warnings
from typing import Optional

import torch


def pending(layer, adapter_names: Optional[list[str]], warn: bool = True) -> list[str]:
    """The adapters a merge would add to this layer (active ones by default), minus those already merged."""
    names = layer.active_adapters if adapter_names is None else adapter_names
    if isinstance(names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {names!r}.")
    names = [n for n in names if n not in layer.merged_adapters]
    if layer.merged and warn:
        if names:
            warnings.warn(f"Already following adapters were merged {','.join(layer.merged_adapters)}. "
                          f"You are now additionally merging {','.join(names)}.")
        else:
            warnings.warn("All adapters are already merged, nothing to do.")
    return [n for n in names if n in layer.lora_A]


def check_mergeable(layer, names: list[str]) -> None:
    weight = layer.base_layer.weight
    if names and (type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point):
        raise NotImplementedError(
            f"Merging into a quantized base layer ({type(layer.base_layer).__name__}) is not supported yet; "
            "merge into a 16-bit copy of the base model instead.")
    if any(layer.lora_bias[n] for n in names) and getattr(layer.base_layer, "bias", None) is None:
        raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")


def merged_tensors(layer, names: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight and bias after merging ``names`` in order, computed in the base dtype as the merge itself
    will be (so an fp16 overflow is seen here), raising on the first adapter that makes them non-finite."""
    base = layer.base_layer
    weight = base.weight.data.clone()
    bias = base.bias.data.clone() if getattr(base, "bias", None) is not None else None
    for name in names:
        weight += layer.get_delta_weight(name).to(weight.dtype)
        if layer.lora_bias[name]:
            bias += (layer.lora_B[name].bias.data * layer.scaling[name]).to(bias.dtype)
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
    return weight, bias


def merge(layer, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
    names = pending(layer, adapter_names)
    check_mergeable(layer, names)
    base = layer.base_layer
    if safe_merge:
        weight, bias = merged_tensors(layer, names)
        base.weight.data = weight
        if bias is not None:
            base.bias.data = bias
    else:  # in place, as PEFT: no second copy of the weight
        for name in names:
            base.weight.data += layer.get_delta_weight(name)
            if layer.lora_bias[name]:
                base.bias.data += layer.lora_B[name].bias.data * layer.scaling[name]
    layer.merged_adapters.extend(names)


def unmerge(layer) -> None:
    if not layer.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    base = layer.base_layer
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        if name not in layer.lora_A:
            continue
        base.weight.data -= layer.get_delta_weight(name).to(base.weight.dtype)
        if layer.lora_bias[name]:
            base.bias.data -= layer.lora_B[name].bias.data * layer.scaling[name]


def merge_layers(layers: list, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
    """Merge into every layer, or into none: structural checks, and with safe_merge a dry run of every layer's
    merged weights, come before the first change."""
    for layer in layers:
        check_mergeable(layer, pending(layer, adapter_names, warn=False))
    if safe_merge:
        for layer in layers:
            merged_tensors(layer, pending(layer, adapter_names, warn=False))
    for layer in layers:
        merge(layer, safe_merge=safe_merge, adapter_names=adapter_names)

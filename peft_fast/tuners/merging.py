"""Merging adapters into base weights: PEFT's semantics and bookkeeping for every tuner, all-or-nothing.

Every check runs before any weight of any layer changes, so a refused merge leaves the model as it was. The tuner
supplies the rule (TunerLayer.merge_context / merge_weight / merge_bias / merge_done and the unmerge side); the base
view supplies how a weight is read and written back:
- dense bases are merged in place, as PEFT does (no second copy of the weight); with safe_merge on a copy first.
- 4-bit bases (bitsandbytes Linear4bit, peft_fast's NF4Linear) as PEFT does it: dequantize, add, re-quantize,
  adapter by adapter (so the packed bytes match PEFT's). The rounding this costs is measured and reported in one
  `QuantizedMergeWarning` per call. `merge_dequantized` instead turns such a layer into a plain nn.Linear holding the
  exact merged weight (`merge_and_unload(dequantize=True)`).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..bases import is_4bit, view_of
from ..bases.bnb8 import is_bnb_8bit
from ..bases.view import offloaded, onloaded
from ..bases.nf4_experts import is_nf4_experts


class QuantizedMergeWarning(UserWarning):
    """Re-quantizing merged 4-bit weights changed them; `max_abs` / `mean_abs` say by how much (over all the
    layers of one call), `adapters` which adapters were merged or unmerged, `layers` how many layers."""

    def __init__(self, message: str, adapters: list[str], layers: int, max_abs: float, mean_abs: float):
        super().__init__(message)
        self.adapters, self.layers, self.max_abs, self.mean_abs = adapters, layers, max_abs, mean_abs


class _Rounding:
    """Abs differences between exact merged weights and their re-quantized values, summed over layers."""

    def __init__(self):
        self.adapters: list[str] = []
        self.layers, self.count, self.total, self.max = 0, 0, 0.0, 0.0

    def add(self, names: list[str], exact: torch.Tensor, requantized: torch.Tensor) -> None:
        diff = (exact.float() - requantized.float()).abs()
        self.adapters.extend(n for n in names if n not in self.adapters)
        self.layers += 1
        self.count += diff.numel()
        self.total += diff.double().sum().item()
        self.max = max(self.max, diff.max().item())

    def warn(self, action: str = "Merging") -> None:
        if not self.layers:
            return
        mean = self.total / self.count
        names = ", ".join(self.adapters)
        hint = (" Pass `dequantize=True` to `merge_and_unload` for a 16-bit model holding the exact merged weights."
                if action == "Merging" else "")
        warnings.warn(QuantizedMergeWarning(
            f"{action} adapter(s) {names} into {self.layers} quantized layer(s) re-quantized the weights, which "
            f"changes the outputs (rounding): between the exact weights and their re-quantized values the max abs "
            f"difference is {self.max:.6e} and the mean abs difference is {mean:.6e}.{hint}",
            list(self.adapters), self.layers, self.max, mean), stacklevel=4)


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
    return [n for n in names if layer.has_adapter(n)]


def check_mergeable(layer, names: list[str]) -> None:
    # Copies of one layer (layer_replication) share its base weights: one copy's delta would reach them all. PEFT
    # means to refuse this too; its check never fires.
    if names and getattr(layer.base_layer, "shared_by_replicas", False):
        raise ValueError("Cannot merge into replicated layers (layer_replication: copies of one layer share its base "
                         "weights, so one copy's delta would reach them all).")
    if names and offloaded(layer.base_layer) and layer.base_view.requantizes:
        raise NotImplementedError(
            f"Merging into a quantized base layer offloaded by accelerate ({type(layer.base_layer).__name__} whose "
            "weight is on the meta device between forwards) is not supported yet. Load the base model without "
            "offloading (no \"cpu\"/\"disk\" in device_map) to merge.")
    if names and not layer.base_view.mergeable():
        raise NotImplementedError(
            f"Merging into a quantized base layer ({type(layer.base_layer).__name__}) is not supported yet; "
            "merge into a 16-bit copy of the base model instead.")
    layer.check_merge(names)


def merged_tensors(layer, names: list[str], check: bool = True):
    """The weight and bias after merging `names` in order, computed on copies as the merge itself will be (so an
    fp16 overflow is seen here), raising on the first adapter that makes them non-finite. A 4-bit base gives the
    exact merged weight (dequantized, plus the deltas). Returns (weight, bias, the rule's merge context)."""
    view = layer.base_view
    weight = view.read_weight() if view.requantizes else view.read_weight().clone()
    bias = view.bias.data.clone() if view.bias is not None else None
    ctx = layer.merge_context(names, weight)
    for name in names:
        weight = layer.merge_weight(name, weight, ctx)
        bias = layer.merge_bias(name, bias)
        if check and (not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
    return weight, bias, ctx


def _merge_quantized(layer, names: list[str], rounding: _Rounding) -> None:
    """PEFT's order, adapter by adapter (so the packed bytes match PEFT's): dequantize, add, re-quantize."""
    view = layer.base_view
    exact = view.read_weight()
    ctx = layer.merge_context(names, exact)
    for name in names:
        exact = layer.merge_weight(name, exact, ctx)
        view.write_weight(layer.merge_weight(name, view.read_weight(), ctx))
        if view.bias is not None:
            layer.merge_bias(name, view.bias.data)
    rounding.add(names, exact, view.read_weight())
    layer.merge_done(ctx)


def _merge(layer, safe_merge: bool, adapter_names: Optional[list[str]], rounding: _Rounding) -> None:
    names = pending(layer, adapter_names)
    check_mergeable(layer, names)
    if not names:
        return
    with onloaded(layer, write_back=True):  # weights accelerate offloaded: in for the merge, then the merged copy
        _merge_names(layer, names, safe_merge, rounding)


def _merge_names(layer, names: list[str], safe_merge: bool, rounding: _Rounding) -> None:
    view = layer.base_view
    if view.requantizes:
        if safe_merge:
            merged_tensors(layer, names)  # raises before the weight changes
        _merge_quantized(layer, names, rounding)
    elif safe_merge:
        weight, bias, ctx = merged_tensors(layer, names)
        view.write_weight(weight)
        if bias is not None:
            view.bias.data = bias
        layer.merge_done(ctx)
    else:  # in place, as PEFT: no second copy of the weight
        ctx = layer.merge_context(names, view.read_weight())
        for name in names:
            view.write_weight(layer.merge_weight(name, view.read_weight(), ctx, live=True))
            if view.bias is not None:
                layer.merge_bias(name, view.bias.data, live=True)
        layer.merge_done(ctx)
    layer.merged_adapters.extend(names)
    layer.invalidate(base=True)


def merge_layers(layers: list, safe_merge: bool, adapter_names: Optional[list[str]], bar=None) -> None:
    """Merge into every layer, or into none: structural checks, and with safe_merge a dry run of every layer's
    merged weights, come before the first change. 4-bit layers warn once, for all of them, about rounding."""
    for layer in layers:
        check_mergeable(layer, pending(layer, adapter_names, warn=False))
    if safe_merge:
        for layer in layers:
            with onloaded(layer):
                merged_tensors(layer, pending(layer, adapter_names, warn=False))
    rounding = _Rounding()
    for layer in layers:
        _merge(layer, safe_merge, adapter_names, rounding)
        if bar is not None:
            bar.update()
    rounding.warn()


def unmerge(layer) -> None:
    if not layer.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    with onloaded(layer, write_back=True):
        _unmerge(layer)


def _unmerge(layer) -> None:
    view = layer.base_view
    rounding, exact, undone = _Rounding(), None, []
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        if not layer.has_adapter(name):
            continue
        if view.requantizes:  # as PEFT: dequantize, subtract, re-quantize
            exact = layer.unmerge_weight(name, view.read_weight() if exact is None else exact)
            view.write_weight(layer.unmerge_weight(name, view.read_weight()))
            undone.append(name)
        else:
            view.write_weight(layer.unmerge_weight(name, view.read_weight(), live=True))
        if view.bias is not None:
            layer.unmerge_bias(name, view.bias.data)
        layer.unmerge_done(name)
    layer.invalidate(base=True)
    if exact is not None:
        rounding.add(undone, exact, view.read_weight())
        rounding.warn("Unmerging")


def merge_dequantized(layers: list, safe_merge: bool, adapter_names: Optional[list[str]], bar=None,
                      dtype: Optional[torch.dtype] = None) -> None:
    """`merge_layers`, except that a 4-bit base is not re-quantized: it becomes a plain nn.Linear holding the
    exact merged weight (dequantized base plus the deltas) and bias. All-or-nothing, as merge_layers."""
    for layer in layers:
        check_mergeable(layer, pending(layer, adapter_names, warn=False))
    if safe_merge:
        for layer in layers:
            with onloaded(layer):
                merged_tensors(layer, pending(layer, adapter_names, warn=False))
    for layer in layers:
        if bar is not None:
            bar.update()
        view = layer.base_view
        if view.quantized and hasattr(view, "make_dense"):  # a 4-bit expert stack: dense first, then merged exactly
            view.make_dense()
            layer.invalidate(base=True)
            view = layer.base_view
        if not view.requantizes:
            _merge(layer, safe_merge, adapter_names, _Rounding())
            continue
        names = pending(layer, adapter_names)
        weight, bias, ctx = merged_tensors(layer, names, check=False)
        layer.base_layer = view.dequantized_linear(weight, bias, dtype)
        layer.merge_done(ctx)
        layer.merged_adapters.extend(names)
        layer.invalidate(base=True)


def dequantize_remaining(model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """Replace every 4-bit or 8-bit layer left in `model` by its dequantized nn.Linear (`dtype`: the model's, for
    layers that do not record theirs); when none is left, drop transformers' quantization markers, so the model
    saves and reloads as the 16-bit model."""
    for key, m in list(model.named_modules()):
        if is_nf4_experts(m):
            m.to_dense()
        if not key or not (is_4bit(m) or is_bnb_8bit(m)):
            continue
        view = view_of(m)
        if not view.mergeable():
            continue
        parent = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
        bias = m.bias.data if m.bias is not None else None
        setattr(parent, key.rpartition(".")[2], view.dequantized_linear(view.read_weight(), bias, dtype))
    if any(is_4bit(m) or is_bnb_8bit(m) or is_nf4_experts(m) for m in model.modules()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype a transformers model was loaded in, as its config records it (None for other models)."""
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None

"""Merging adapters into base weights, PEFT's semantics, and all-or-nothing: every check runs before any weight
of any layer changes, so a refused merge leaves the model as it was.

A bitsandbytes 4-bit base (Linear4bit, nf4 or fp4) is merged as PEFT does it: dequantize, add the delta, and
re-quantize into a new Params4bit with the same settings (unmerge: dequantize, subtract, re-quantize). The rounding
this costs is measured and reported in one `QuantizedMergeWarning` per call. `merge_dequantized` instead turns such a
layer into a plain nn.Linear holding the exact merged weight (`merge_and_unload(dequantize=True)`).

DoRA adapters merge as PEFT's DoraLinearVariant: W' = (m / ||W0 + ΔW||) ⊙ (W + ΔW), the norm taken over the base
W0 with every previously merged adapter taken out again (PEFT unmerges and re-merges them; here W0 is computed
on a copy), and kept per layer until unmerge, which needs it: W = W' / (m / norm) - ΔW.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.nn as nn

from . import dora
from .nf4_linear import NF4Linear
from .quantized import is_4bit_base, is_bnb_4bit


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
            f"{action} adapter(s) {names} into {self.layers} 4-bit layer(s) re-quantized the weights, which changes "
            f"the outputs (rounding): between the exact weights and their re-quantized values the max abs difference "
            f"is {self.max:.6e} and the mean abs difference is {mean:.6e}.{hint}",
            list(self.adapters), self.layers, self.max, mean), stacklevel=3)


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


def is_4bit(layer) -> bool:
    """The layer's base is peft_fast's NF4Linear, or a bitsandbytes 4-bit layer holding a quantized Params4bit."""
    base = layer.base_layer
    return _quantized_4bit(base)


def _quantized_4bit(base) -> bool:
    if isinstance(base, NF4Linear):
        return True
    return is_bnb_4bit(base) and type(base.weight).__name__ == "Params4bit" and _quant_state(base) is not None


def _quant_state(base):
    if isinstance(base, NF4Linear):
        return base.quant_state
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)  # bnb recovers a lost one from the module


def dequantize_4bit(base) -> torch.Tensor:
    """The base layer's weight, dequantized by bitsandbytes (in the quant state's dtype, the loading dtype); a
    weight repacked for bnb's AVX512-BF16 CPU kernel is read back through bnb's own inverse first."""
    if isinstance(base, NF4Linear):
        return base.dequantize()
    import bitsandbytes as bnb

    data, qs = base.weight.data, _quant_state(base)
    if getattr(qs, "packing_format_for_cpu", False):  # bnb's inverse rewrites the state it is given: give a copy
        data, qs = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(qs))
    return bnb.functional.dequantize_4bit(data, qs)


def _requantize(base, weight: torch.Tensor) -> None:
    """PEFT's re-quantization: a new Params4bit with the old one's settings, quantized on the CPU, moved back."""
    if isinstance(base, NF4Linear):
        return base.requantize(weight)
    import bitsandbytes as bnb

    old = base.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_")}
    kwargs.pop("data", None)
    kwargs["bnb_quantized"] = False
    kwargs["requires_grad"] = False
    base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)


def check_mergeable(layer, names: list[str]) -> None:
    weight = layer.base_layer.weight
    quantized = type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point
    if names and quantized and not is_4bit(layer):
        raise NotImplementedError(
            f"Merging into a quantized base layer ({type(layer.base_layer).__name__}) is not supported yet; "
            "merge into a 16-bit copy of the base model instead.")
    if any(layer.lora_bias[n] for n in names) and getattr(layer.base_layer, "bias", None) is None:
        raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")


def _unmerged_base(layer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (the current base weight, or a copy) with the layer's merged adapters taken out, newest first."""
    for name in reversed(layer.merged_adapters):
        if name not in layer.lora_A:
            continue
        if layer.use_dora.get(name):
            weight = dora.unmerged_weight(layer, name, weight)
        else:
            weight = weight - layer.get_delta_weight(name).to(weight.dtype)
    return weight


def _dora_base(layer, names: list[str], weight: torch.Tensor) -> Optional[torch.Tensor]:
    if not any(layer.use_dora.get(n) for n in names):
        return None
    return _unmerged_base(layer, weight.detach().clone())


def _record(layer, norms: dict) -> None:
    layer.__dict__.setdefault("_dora_merged_norm", {}).update(norms)
    dora.clear(layer, base=True)


def merged_tensors(layer, names: list[str], check: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """The weight and bias after merging ``names`` in order, computed in the base dtype as the merge itself
    will be (so an fp16 overflow is seen here), raising on the first adapter that makes them non-finite.
    A 4-bit base gives the exact merged weight: dequantized, plus the deltas, in PEFT's promoted dtype.
    Also returns the DoRA norms the merge used (unmerge needs them)."""
    base = layer.base_layer
    q4 = is_4bit(layer)
    weight = dequantize_4bit(base) if q4 else base.weight.data.clone()
    bias = base.bias.data.clone() if getattr(base, "bias", None) is not None else None
    w0, norms = _dora_base(layer, names, weight), {}
    for name in names:
        if layer.use_dora.get(name):
            norms[name] = dora.merge_norm(layer, name, w0)
            weight = dora.merged_weight(layer, name, weight, norms[name])
        elif q4:
            weight = weight + layer.get_delta_weight(name)  # as PEFT: `output + lora_data`, promoted
        else:
            weight += layer.get_delta_weight(name).to(weight.dtype)
        if layer.lora_bias[name]:
            bias += (layer.lora_B[name].bias.data * layer.scaling[name]).to(bias.dtype)
        if check and (not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
    return weight, bias, norms


def _merge_4bit(layer, names: list[str], rounding: _Rounding) -> None:
    """PEFT's order, adapter by adapter (so the packed bytes match PEFT's): dequantize, add, re-quantize."""
    base = layer.base_layer
    exact = dequantize_4bit(base)
    w0, norms = _dora_base(layer, names, exact), {}
    for name in names:
        if layer.use_dora.get(name):
            norms[name] = dora.merge_norm(layer, name, w0)
            exact = dora.merged_weight(layer, name, exact, norms[name])
            _requantize(base, dora.merged_weight(layer, name, dequantize_4bit(base), norms[name]))
        else:
            delta = layer.get_delta_weight(name)
            exact = exact + delta
            _requantize(base, dequantize_4bit(base) + delta)
        if layer.lora_bias[name]:
            base.bias.data += (layer.lora_B[name].bias.data * layer.scaling[name]).to(base.bias.dtype)
    rounding.add(names, exact, dequantize_4bit(base))
    _record(layer, norms)


def _merge(layer, safe_merge: bool, adapter_names: Optional[list[str]], rounding: _Rounding) -> None:
    names = pending(layer, adapter_names)
    check_mergeable(layer, names)
    base = layer.base_layer
    if not names:
        return
    if is_4bit(layer):
        if safe_merge:
            merged_tensors(layer, names)  # raises before the weight changes
        _merge_4bit(layer, names, rounding)
    elif safe_merge:
        weight, bias, norms = merged_tensors(layer, names)
        base.weight.data = weight
        if bias is not None:
            base.bias.data = bias
        _record(layer, norms)
    else:  # in place, as PEFT: no second copy of the weight (a DoRA adapter rescales it: a new one, as PEFT)
        w0, norms = _dora_base(layer, names, base.weight.data), {}
        for name in names:
            if layer.use_dora.get(name):
                norms[name] = dora.merge_norm(layer, name, w0)
                base.weight.data = dora.merged_weight(layer, name, base.weight.data, norms[name])
                continue
            base.weight.data += layer.get_delta_weight(name)
            if layer.lora_bias[name]:
                base.bias.data += layer.lora_B[name].bias.data * layer.scaling[name]
        _record(layer, norms)
    layer.merged_adapters.extend(names)


def merge(layer, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
    rounding = _Rounding()
    _merge(layer, safe_merge, adapter_names, rounding)
    rounding.warn()


def unmerge(layer) -> None:
    if not layer.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    base = layer.base_layer
    q4, rounding, exact, undone = is_4bit(layer), _Rounding(), None, []
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        if name not in layer.lora_A:
            continue
        is_dora = layer.use_dora.get(name)
        if q4:  # as PEFT: dequantize, subtract, re-quantize
            exact = dequantize_4bit(base) if exact is None else exact
            if is_dora:
                exact = dora.unmerged_weight(layer, name, exact)
                _requantize(base, dora.unmerged_weight(layer, name, dequantize_4bit(base)))
            else:
                delta = layer.get_delta_weight(name)
                exact = exact - delta
                _requantize(base, dequantize_4bit(base) - delta)
            undone.append(name)
        elif is_dora:
            base.weight.data = dora.unmerged_weight(layer, name, base.weight.data)
        else:
            base.weight.data -= layer.get_delta_weight(name).to(base.weight.dtype)
        if is_dora:
            layer.__dict__.get("_dora_merged_norm", {}).pop(name, None)
        if layer.lora_bias[name]:
            base.bias.data -= (layer.lora_B[name].bias.data * layer.scaling[name]).to(base.bias.dtype)
    dora.clear(layer, base=True)
    if exact is not None:
        rounding.add(undone, exact, dequantize_4bit(base))
        rounding.warn("Unmerging")


def merge_layers(layers: list, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
    """Merge into every layer, or into none: structural checks, and with safe_merge a dry run of every layer's
    merged weights, come before the first change. 4-bit layers warn once, for all of them, about rounding."""
    for layer in layers:
        check_mergeable(layer, pending(layer, adapter_names, warn=False))
    if safe_merge:
        for layer in layers:
            merged_tensors(layer, pending(layer, adapter_names, warn=False))
    rounding = _Rounding()
    for layer in layers:
        _merge(layer, safe_merge, adapter_names, rounding)
    rounding.warn()


def dequantized_linear(base, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """A plain nn.Linear in the dtype the 4-bit base was loaded in (its quant state's dtype, which is what its
    inputs and outputs have), holding ``weight`` and ``bias``."""
    qs = _quant_state(base)
    dtype = qs.original_dtype if getattr(qs, "packing_format_for_cpu", False) else qs.dtype  # bnb's CPU repacking
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    linear.train(base.training)
    return linear


def merge_dequantized(layers: list, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
    """`merge_layers`, except that a 4-bit base is not re-quantized: it becomes a plain nn.Linear holding the
    exact merged weight (dequantized base plus the deltas) and bias. All-or-nothing, as merge_layers."""
    for layer in layers:
        check_mergeable(layer, pending(layer, adapter_names, warn=False))
    if safe_merge:
        for layer in layers:
            merged_tensors(layer, pending(layer, adapter_names, warn=False))
    for layer in layers:
        if not is_4bit(layer):
            _merge(layer, safe_merge, adapter_names, _Rounding())
            continue
        names = pending(layer, adapter_names)
        weight, bias, norms = merged_tensors(layer, names, check=False)
        layer.base_layer = dequantized_linear(layer.base_layer, weight, bias)
        _record(layer, norms)
        layer.merged_adapters.extend(names)


def dequantize_remaining(model: nn.Module) -> None:
    """Replace every 4-bit layer (bitsandbytes or NF4Linear) left in ``model`` by its dequantized nn.Linear; when
    none is left, drop transformers' quantization markers, so the model saves and reloads as the 16-bit model."""
    for key, m in list(model.named_modules()):
        if key and _quantized_4bit(m):
            parent = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
            bias = m.bias.data if m.bias is not None else None
            setattr(parent, key.rpartition(".")[2], dequantized_linear(m, dequantize_4bit(m), bias))
    if any(is_4bit_base(m) for m in model.modules()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)

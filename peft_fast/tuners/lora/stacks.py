"""Per-layer stacked adapter weights for the batched mixed-adapter kernels, written when adapters change and
reused by every mixed batch until then (kernels/multi_lora.py takes them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...kernels.common.dot_policy import half_dots


def stack_dtype(x: torch.Tensor, adapter_dtype: torch.dtype, on_triton: bool) -> torch.dtype:
    """The kernels' dots meet in 16-bit activations' type anyway, so 16-bit stacks give the same result with half
    the memory and half the adapter bytes read per token. The reference keeps PEFT's dtype (its exact math)."""
    if on_triton and half_dots(x.dtype):
        return x.dtype
    return adapter_dtype


@dataclass
class AdapterStacks:
    a: torch.Tensor  # [n_slots, r_max, in]
    b: torch.Tensor  # [n_slots, out, r_max]
    ranks: torch.Tensor  # int32 [n_slots]; 0 where this layer lacks the adapter
    scalings: torch.Tensor  # float32 [n_slots]
    bias: Optional[torch.Tensor]  # [n_slots, out] when some adapter has lora_bias
    dora_scale: Optional[torch.Tensor] = None  # [n_slots, out] when some adapter is DoRA: m / norm, 1 elsewhere


def _adapter_params(layer, slot_names: tuple[str, ...]) -> list[torch.Tensor]:
    # Straight through the module dicts: nn.Module.__getattr__ would cost ~1 µs per lookup, on every forward.
    a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
    m_mods = layer.lora_magnitude_vector._modules
    out = []
    for name in slot_names:
        a = a_mods.get(name)
        if a is None:
            continue
        b_params = b_mods[name]._parameters
        out += [a._parameters["weight"], b_params["weight"]]
        if b_params.get("bias") is not None:
            out.append(b_params["bias"])
        if name in m_mods:  # a DoRA adapter's scale depends on its magnitude too
            out.append(m_mods[name]._parameters["weight"])
    return out


class StackCache:
    """A layer's stacked adapters and what they were built from. Checked on every mixed batch: the adapter set,
    each parameter's version counter (an optimizer step or load bumps it) and storage (``p.data = ...`` swaps it),
    so the stacks are never stale; only what changed triggers a rebuild."""

    def __init__(self, layer, slot_names: tuple[str, ...], dtype: torch.dtype):
        self.slot_names, self.dtype = slot_names, dtype
        self.params = _adapter_params(layer, slot_names)
        self.state = self._state(layer)
        self.stacks = build_stacks(layer, slot_names, dtype)

    def _state(self, layer) -> list:
        # A DoRA scale also depends on the base weight (its norm): its identity, storage and version.
        dora_base = (layer.base_view.version() if any(_scales_channels(layer, n) for n in self.slot_names)
                     else None)
        return ([p._version for p in self.params] + [p.data_ptr() for p in self.params]
                + [_scalar(layer.scaling.get(n)) for n in self.slot_names] + [dora_base])

    def fresh(self, layer, slot_names: tuple[str, ...], dtype: torch.dtype) -> bool:
        if slot_names != self.slot_names or dtype != self.dtype:
            return False
        current = _adapter_params(layer, slot_names)
        return (len(current) == len(self.params) and all(a is b for a, b in zip(current, self.params))
                and self._state(layer) == self.state)


def _scales_channels(layer, name: str) -> bool:
    variant = layer.variant(name) if name in layer.lora_A else None
    return variant is not None and variant.scales_channels


def _scalar(scaling) -> Optional[float]:
    """Scalings are floats, or 0-d tensors once prepared for compiled hotswap."""
    return float(scaling) if isinstance(scaling, torch.Tensor) else scaling


def build_stacks(layer, slot_names: tuple[str, ...], dtype: torch.dtype) -> AdapterStacks:
    present = [n for n in slot_names if n in layer.lora_A]
    ref = layer.lora_A[present[0]].weight
    r_max = max(layer.r[n] for n in present)
    n = len(slot_names)
    a = torch.zeros(n, r_max, layer.in_features, device=ref.device, dtype=dtype)
    b = torch.zeros(n, layer.out_features, r_max, device=ref.device, dtype=dtype)
    ranks = torch.zeros(n, dtype=torch.int32)
    scalings = torch.zeros(n, dtype=torch.float32)
    has_bias = any(layer.lora_B[p].bias is not None for p in present)
    bias = torch.zeros(n, layer.out_features, device=ref.device, dtype=dtype) if has_bias else None
    with torch.no_grad():
        for i, name in enumerate(slot_names):
            if name not in layer.lora_A:
                continue
            r = layer.r[name]
            a[i, :r] = layer.lora_A[name].weight
            b[i, :, :r] = layer.lora_B[name].weight
            ranks[i], scalings[i] = r, _scalar(layer.scaling[name])
            if bias is not None and layer.lora_B[name].bias is not None:
                bias[i] = layer.lora_B[name].bias
    dora_scale = None
    dora_names = [n for n in present if _scales_channels(layer, n)]
    if dora_names:
        # Kept in the magnitude's dtype (float32): the expand's epilogue applies it at accumulator precision.
        m_dtype = layer.lora_magnitude_vector[dora_names[0]].weight.dtype
        dora_scale = torch.ones(n, layer.out_features, device=ref.device, dtype=m_dtype)
        with torch.no_grad():
            for i, name in enumerate(slot_names):
                if name in dora_names:
                    dora_scale[i] = layer.variant(name).mixed_scale(layer, name)
    return AdapterStacks(a, b, ranks.to(ref.device), scalings.to(ref.device), bias, dora_scale)

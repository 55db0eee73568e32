"""Per-layer stacked adapter weights for the batched mixed-adapter kernels, written when adapters change and
reused by every mixed batch until then (kernels/multi_lora.py takes them)."""
from __future__ import annotations

import functools
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
    # Some adapter's module must run as a module (bases/view.py `must_call`): the layer then runs PEFT's loop, and
    # that adapter's slot holds rank 0 (its weights may not even be there, e.g. offloaded by accelerate)
    modules: bool = False


_CALLED = ("called as modules",)  # the signature of an adapter run through its modules (an empty slot)


def _slot_params(layer, name: Optional[str]) -> list[torch.Tensor]:
    """What adapter `name`'s slot is built from (None: a free slot)."""
    # Straight through the module dicts: nn.Module.__getattr__ would cost ~1 µs per lookup.
    a = layer.lora_A._modules.get(name) if name is not None else None
    if a is None:
        return []
    b_params = layer.lora_B._modules[name]._parameters
    out = [a._parameters["weight"], b_params["weight"]]
    if b_params.get("bias") is not None:
        out.append(b_params["bias"])
    m = layer.lora_magnitude_vector._modules.get(name)
    if m is not None:  # a DoRA adapter's scale depends on its magnitude too
        out.append(m._parameters["weight"])
    return out


_FORGOTTEN = ("forgotten",)  # a signature no slot has (a free slot's is ())


class StackCache:
    """A layer's adapter slots for the batched kernels: one preallocated stack per operand with room for
    `capacity` adapters of rank up to `r_cap`, grown by doubling. `update` writes only the slots whose adapter
    changed (added, loaded, trained, deleted: its parameters' identity, storage or version, its scaling, and for
    DoRA the base weight), so an event costs one slot, not a repack; a forward only reads them."""

    def __init__(self, layer, slot_names: tuple, dtype: torch.dtype, b_rank_major: bool = False):
        self.dtype, self.b_rank_major = dtype, b_rank_major
        self.adapter_dtype: Optional[torch.dtype] = None  # the adapters' own dtype, which the stacks' follows
        self.slot_names: tuple = ()
        self.signatures: list = []
        self.capacity = self.r_cap = 0
        self.has_bias = self.has_dora = False
        self.full: Optional[AdapterStacks] = None
        self.stacks: Optional[AdapterStacks] = None
        self.update(layer, slot_names)

    def _signature(self, layer, name: Optional[str]) -> tuple:
        if name is not None and name in layer.lora_A and layer.calls_modules([name]):
            return _CALLED
        params = _slot_params(layer, name)
        if not params:
            return ()
        dora = layer.base_view.version() if _scales_channels(layer, name) else None
        return (tuple((id(p), p.data_ptr(), p._version) for p in params), layer.r[name],
                _scalar(layer.scaling[name]), dora)

    def forget(self) -> None:
        """Rewrite every slot in use at the next update, whatever its parameters' signatures say (the ones beyond
        were freed, and nothing reads them)."""
        n = len(self.slot_names)
        self.signatures = [_FORGOTTEN] * n + self.signatures[n:]

    def update(self, layer, slot_names: tuple) -> int:
        """Bring the slots up to date with `slot_names` (the model's slot order; None: a free slot). Returns how
        many slots were written."""
        sigs = [self._signature(layer, n) for n in slot_names]
        present = [n for n in slot_names if n is not None and n in layer.lora_A]
        r_need = max((layer.r[n] for n in present), default=1)
        # over the layer's adapters, not this batch's (a patched PEFT model's table is each batch's names)
        has_bias = any(layer.lora_B[n].bias is not None for n in layer.lora_A)
        has_dora = any(_scales_channels(layer, n) for n in layer.lora_A)
        ref = layer.lora_A[present[0]].weight if present else None
        # Shrunk once the layer's adapters use a quarter of the room (slots freed at the table's end, lower ranks):
        # amortised like the doubling. Measured on the layer's adapters, not this batch's (a patched PEFT model's
        # table is each batch's names), so alternating batches do not reallocate.
        held = max(1, len(slot_names), len(layer.lora_A))
        r_held = max([layer.r[n] for n in layer.lora_A] + [r_need])
        shrink = self.full is not None and (4 * held <= self.capacity or 4 * r_held <= self.r_cap)
        if (self.full is None or len(slot_names) > self.capacity or r_need > self.r_cap or has_bias != self.has_bias
                or has_dora != self.has_dora or (ref is not None and ref.device != self.full.a.device) or shrink):
            self._allocate(layer, len(slot_names), held, r_held, has_bias, has_dora, ref)
            self.signatures = [()] * self.capacity
        written = 0
        for i, (name, sig) in enumerate(zip(slot_names, sigs)):
            # (a free slot stays free: its rank is 0 whichever adapter now names it)
            if sig != self.signatures[i] or (sig and i < len(self.slot_names) and self.slot_names[i] != name):
                write_slot(self.full, i, layer, name if sig and sig != _CALLED else None)
                self.signatures[i] = sig
                written += 1
        for i in range(len(slot_names), len(self.slot_names)):  # slots beyond the model's now: free them
            if self.signatures[i]:
                write_slot(self.full, i, layer, None)
                self.signatures[i] = ()
        self.slot_names = tuple(slot_names)
        n, f = len(slot_names), self.full
        self.stacks = AdapterStacks(f.a[:n], f.b[:n], f.ranks[:n], f.scalings[:n],
                                    f.bias[:n] if f.bias is not None else None,
                                    f.dora_scale[:n] if f.dora_scale is not None else None, _CALLED in sigs)
        return written

    def _allocate(self, layer, n: int, held: int, r_held: int, has_bias: bool, has_dora: bool, ref) -> None:
        """Room for n slots (held: what the layer's adapters need, at least n) of rank r_held."""
        if n > self.capacity:  # doubled
            capacity = max(held, 2 * self.capacity)
        elif 4 * held <= self.capacity:  # shrunk, with room to grow back to twice that before the next doubling
            capacity = 2 * held
        else:
            capacity = self.capacity
        r_cap = self.r_cap if r_held <= self.r_cap < 4 * r_held else r_held
        device = ref.device if ref is not None else torch.device("cpu")
        zeros = functools.partial(torch.zeros, device=device)
        m_dtype = next((layer.lora_magnitude_vector[m].weight.dtype for m in layer.lora_magnitude_vector), None)
        self.full = AdapterStacks(
            zeros(capacity, r_cap, layer.in_features, dtype=self.dtype),
            # B is [n_slots, out, r_max] either way; stored rank-major, a slot's first r ranks are r contiguous rows,
            # which the CPU reference's matmuls read at twice the speed of out rows strided by r_max
            (zeros(capacity, r_cap, layer.out_features, dtype=self.dtype).transpose(1, 2) if self.b_rank_major
             else zeros(capacity, layer.out_features, r_cap, dtype=self.dtype)),
            zeros(capacity, dtype=torch.int32), zeros(capacity, dtype=torch.float32),
            zeros(capacity, layer.out_features, dtype=self.dtype) if has_bias else None,
            torch.ones(capacity, layer.out_features, device=device, dtype=m_dtype) if has_dora else None)
        self.capacity, self.r_cap, self.has_bias, self.has_dora = capacity, r_cap, has_bias, has_dora
        self.slot_names = ()


def _scales_channels(layer, name: str) -> bool:
    variant = layer.variant(name) if name in layer.lora_A else None
    return variant is not None and variant.scales_channels


def _scalar(scaling) -> Optional[float]:
    """Scalings are floats, or 0-d tensors once prepared for compiled hotswap."""
    return float(scaling) if isinstance(scaling, torch.Tensor) else scaling


def write_slot(stacks: AdapterStacks, i: int, layer, name: Optional[str]) -> None:
    """Slot i of the stacks holds adapter `name` of `layer` (None or absent: rank 0, which the kernels skip; its
    padding is never read)."""
    with torch.no_grad():
        if name is None or name not in layer.lora_A:
            stacks.ranks[i], stacks.scalings[i] = 0, 0.0
            if stacks.dora_scale is not None:
                stacks.dora_scale[i] = 1.0
            return
        r = layer.r[name]
        stacks.a[i, :r] = layer.lora_A[name].weight
        stacks.b[i, :, :r] = layer.lora_B[name].weight
        stacks.ranks[i], stacks.scalings[i] = r, _scalar(layer.scaling[name])
        if stacks.bias is not None:
            bias = layer.lora_B[name].bias
            stacks.bias[i] = bias if bias is not None else 0.0
        if stacks.dora_scale is not None:
            stacks.dora_scale[i] = layer.variant(name).mixed_scale(layer, name) if _scales_channels(layer, name) \
                else 1.0

"""4-bit expert stacks: a transformers mixture-of-experts module whose 3-D expert weights (`gate_up_proj`,
`down_proj`, ...) are stored as NF4/FP4 codes, what `peft_fast.quantize` makes of an MoE model's experts.

bitsandbytes (and so transformers' 4-bit loading and PEFT) quantizes nn.Linear layers only: an MoE model's experts,
most of its weights, stay 16-bit there. Here each stack is quantized as bitsandbytes would quantize that tensor
(kernels/nf4_quantize.py: the same bytes as `quantize_4bit` of the [E, out, in] stack), and the module keeps its own
class, attributes and forward contract: `quantize_experts` swaps in a subclass whose stacks are read-only properties
that dequantize, and whose forward is the grouped experts forward (experts.py), which dequantizes each stack for
its grouped matmul and again in the backward instead of keeping a dense copy. LoRA reaches the stacks through
`target_parameters` as it reaches dense ones; merging re-quantizes, as for 4-bit linear layers.
State dict: under each stack's own key, the packed codes, with transformers' 4-bit companions (`<stack>.absmax`,
`<stack>.quant_map`, `<stack>.quant_state.bitsandbytes__nf4`, ...), as NF4Linear writes its weight.
The codes are frozen parameters, `<stack>_nf4` (the stack's own name reads dense): DDP does not broadcast them every
step as it does buffers, FSDP2 shards them, and `quant_storage` (NF4Linear's) lets torch versions whose
`fully_shard` refuses integer parameters (2.11) shard them as a float type.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn

from ..kernels import NF4State, nf4_dequantize, nf4_quantize
from ..kernels.common.nf4_format import code_bytes
from .experts import experts_forward, is_experts_module, stack_shape
from .nf4_linear import (STORAGES, NF4Linear, _dtype_name, apply_keeping_codes, check_storable, code_view,
                         save_4bit_state, state_key_tree, storage_dtype, stored)

__all__ = ["NF4Experts", "quantize_experts", "is_nf4_experts"]

_CLASSES: dict[type, type] = {}


class NF4Experts(nn.Module):
    """Mixed in before a transformers experts class (see quantize_experts); never instantiated directly."""

    _nf4_names: tuple[str, ...] = ()
    _dense_class: type = nn.Module  # the transformers class it was made from
    quant_storage: torch.dtype = torch.uint8

    def nf4_state(self, name: str) -> Optional[NF4State]:
        return self._nf4_states.get(name)

    def packed(self, name: str) -> torch.Tensor:
        """Stack `name`'s packed codes as uint8 [bytes, 1], what the kernels read (NF4Linear.codes)."""
        w = self._parameters[stack_codes(name)]
        if w.dtype == torch.uint8:
            return w
        what = f"{type(self).__name__}.{name}: its 4-bit codes"
        if torch.compiler.is_compiling():
            return code_view(w, self.quant_storage, None, what)[0]
        view, self._code_views[name] = code_view(w, self.quant_storage, self._code_views.get(name), what)
        return view

    def _store(self, name: str, packed: torch.Tensor) -> None:
        """Keep uint8 codes `packed` as stack `name`, a frozen parameter in quant_storage."""
        # (not register_parameter: its hasattr check would read the stack's property, dequantizing it)
        self._parameters[stack_codes(name)] = nn.Parameter(stored(packed, self.quant_storage), requires_grad=False)
        self._code_views.pop(name, None)

    def dequantize(self, name: str) -> torch.Tensor:
        """Stack `name`, dense, in the dtype it was quantized from."""
        return nf4_dequantize(self.packed(name), self._nf4_states[name])

    def requantize(self, name: str, weight: torch.Tensor) -> None:
        """Replace stack `name` by the 4-bit rounding of `weight` (merging adapters into it)."""
        state = self._nf4_states[name]
        if tuple(weight.shape) != tuple(state.shape):
            raise ValueError(f"requantize: {name} has shape {tuple(state.shape)}, got {tuple(weight.shape)}")
        # (in the stack's own dtype, unlike NF4Linear's promoted sum: without a compute dtype the grouped matmuls
        # compute in it, and no PEFT merge of 4-bit experts exists to match)
        self._set(name, weight.detach().to(state.dtype), state.blocksize, state.nested, state.quant_type)

    def _set(self, name: str, weight: torch.Tensor, blocksize: int, double_quant: bool, quant_type: str) -> None:
        packed, state = nf4_quantize(weight, blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type=quant_type)
        self._store(name, packed)
        self._nf4_states[name] = state

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return experts_forward(self, {}, hidden_states, top_k_index, top_k_weights)

    def to_dense(self) -> nn.Module:
        """Back to the original class with dense stacks (in place; returns the module)."""
        dense = {n: self.dequantize(n) for n in self._nf4_names}
        for n in self._nf4_names:
            del self._parameters[stack_codes(n)]
        del self._nf4_states, self._code_views
        self.__class__ = self._dense_class
        for n, w in dense.items():
            self.register_parameter(n, nn.Parameter(w, requires_grad=False))
        return self

    def __getstate__(self):
        # the cached uint8 views of float-stored codes alias the codes' storage as another dtype: torch.save refuses
        state = super().__getstate__().copy()
        state["_code_views"] = {}
        return state

    def __reduce_ex__(self, protocol):
        # The NF4<cls> class is made at runtime: a pickle names the transformers class and remakes it on load.
        return _remake, (self._dense_class, self._nf4_names), self.__getstate__()

    def _apply(self, fn, recurse=True):
        # The codes keep their bytes under every cast; the states follow the device only.
        apply_keeping_codes(self, [stack_codes(n) for n in self._nf4_names], self.quant_storage,
                            lambda: super(NF4Experts, self)._apply(fn, recurse))
        self._code_views.clear()
        for n in self._nf4_names:
            device = self.packed(n).device
            if self._nf4_states[n].absmax.device != device:
                self._nf4_states[n] = self._nf4_states[n].to(device)
        return self

    def extra_repr(self) -> str:
        s = self._nf4_states[self._nf4_names[0]]
        storage = "" if self.quant_storage == torch.uint8 else f", quant_storage={_dtype_name(self.quant_storage)}"
        return f"4-bit stacks {list(self._nf4_names)}, quant_type={s.quant_type}, blocksize={s.blocksize}, " \
               f"double_quant={s.nested}{storage}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for n in self._nf4_names:  # the codes under the stack's own key, as stored (a DTensor under FSDP2)
            destination[prefix + n] = destination.pop(prefix + stack_codes(n))
            save_4bit_state(destination, prefix + n, self._nf4_states[n])

    def _fqn_modifiers(self) -> dict[str, str]:
        """torch.distributed.checkpoint's state-dict helpers resolve each key as an attribute path: a stack's name
        reads it dequantized (a property), so its keys resolve through `_state_keys` (NF4Linear._fqn_modifiers)."""
        return dict.fromkeys(self._nf4_names, "_state_keys")

    @property
    def _state_keys(self):
        return SimpleNamespace(**{n: state_key_tree(self._nf4_states[n]) for n in self._nf4_names})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = {}
        for n in self._nf4_names:
            key = prefix + n
            blobs = [k for k in state_dict if k.startswith(key + ".quant_state.bitsandbytes__")]
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            if not blobs:
                error_msgs.append(f"{key}: a 4-bit expert stack needs its quant state ({key}.absmax, "
                                  f"{key}.quant_state.bitsandbytes__nf4, ...); got the stack alone.")
                continue
            try:
                state = NF4Linear._state_from(state_dict, key + ".", blobs[0])
            except (KeyError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
                error_msgs.append(f"{key}: the 4-bit quant state is corrupt or incomplete ({e!r}).")
                continue
            packed = state_dict[key]
            if packed.dtype != torch.uint8 and packed.dtype in STORAGES.values():  # another quant_storage: its bytes
                packed = code_bytes(packed.detach())
            if tuple(state.shape) != tuple(self._nf4_states[n].shape) or packed.dtype != torch.uint8 or \
                    packed.numel() != (state.shape.numel() + 1) // 2:
                error_msgs.append(f"{key}: a 4-bit stack of shape {tuple(state.shape)} does not fit this module's "
                                  f"{tuple(self._nf4_states[n].shape)}.")
                continue
            ours[n] = (packed, state)
        # The codes' own parameter name is not a saved key: beside the stack's key (torch.distributed.checkpoint's
        # set_model_state_dict adds the module's named parameters) the stack's key is what loads; alone it would
        # pair bytes with a stale state, so it is refused.
        named = {prefix + stack_codes(n): prefix + n for n in self._nf4_names if prefix + stack_codes(n) in state_dict}
        unexpected_keys.extend(k for k, stack in named.items() if stack not in state_dict)
        rest = {k: v for k, v in state_dict.items() if k not in named and
                not any(k == prefix + n or k.startswith(prefix + n + ".") for n in self._nf4_names)}
        before = len(missing_keys)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        codes = {prefix + stack_codes(n) for n in self._nf4_names}  # saved under the stack's name, handled above
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in codes]
        if error_msgs:
            return
        for n, (packed, state) in ours.items():
            device = self._parameters[stack_codes(n)].device
            self._store(n, packed.detach().to(device).reshape(-1, 1).clone())
            self._nf4_states[n] = state.to(device)


def _nf4_class(cls: type, names: tuple[str, ...]) -> type:
    key = (cls, names)
    if key not in _CLASSES:
        stacks = {n: property(lambda self, n=n: self.dequantize(n), doc=f"{n}, dequantized") for n in names}
        _CLASSES[key] = type(f"NF4{cls.__name__}", (NF4Experts, cls),
                             {"_nf4_names": names, "_dense_class": cls, "__module__": __name__, **stacks})
    return _CLASSES[key]


def _remake(cls: type, names: tuple[str, ...]) -> nn.Module:
    return _nf4_class(cls, names).__new__(_nf4_class(cls, names))


def is_nf4_experts(module: nn.Module) -> bool:
    return isinstance(module, NF4Experts)


def code_parameters(model: nn.Module) -> dict[int, nn.Parameter]:
    """peft_fast's parameters that hold packed 4-bit codes (NF4Linear weights, 4-bit expert stacks), by id: bytes,
    not values, whatever dtype stores them."""
    found = {}
    for m in model.modules():
        if isinstance(m, NF4Linear):
            found[id(m.weight)] = m.weight
        elif isinstance(m, NF4Experts):
            found.update((id(p), p) for p in (m._parameters[stack_codes(n)] for n in m._nf4_names))
    return found


def stack_codes(name: str) -> str:
    """The name of the parameter holding 4-bit stack `name`'s codes (the stack's own name reads it dense)."""
    return f"{name}_nf4"


def expert_stacks(module: nn.Module) -> tuple[str, ...]:
    """The 3-D expert stacks of a transformers experts module (what quantize_experts stores in 4 bits)."""
    names = [n for n in ("gate_up_proj", "up_proj", "down_proj") if stack_shape(module, n) is not None]
    return tuple(n for n in names if len(stack_shape(module, n)) == 3)


def quantize_experts(module: nn.Module, *, blocksize: int = 64, double_quant: bool = True,
                     quant_type: str = "nf4", compute_dtype: Optional[torch.dtype] = None,
                     quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Store `module`'s expert stacks in 4 bits, in place (its class becomes NF4<class>); returns the module.
    `compute_dtype`: the grouped matmuls' dtype (bitsandbytes' compute dtype; None: the stacks' own dtype);
    `quant_storage`: the dtype the codes' parameters hold the bytes in (NF4Linear's)."""
    if is_nf4_experts(module):
        return module
    if not is_experts_module(module):
        raise ValueError(f"quantize_experts: {type(module).__name__} is not a transformers experts module "
                         "(3-D gate_up_proj/up_proj and down_proj stacks with num_experts)")
    storage = storage_dtype(quant_storage)
    names = expert_stacks(module)
    dense = {n: module._parameters[n].detach() for n in names}
    for n, w in dense.items():
        if not w.dtype.is_floating_point or w.dtype == torch.float64 or not torch.isfinite(w).all():
            raise ValueError(f"quantize: {type(module).__name__}.{n} must be finite float32/float16/bfloat16, got "
                             f"{w.dtype}")
        check_storable((w.numel() + 1) // 2, storage, f"quantize: {type(module).__name__}.{n}'s {tuple(w.shape)} stack")
    made = {n: nf4_quantize(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
            for n, w in dense.items()}  # all quantized before the module changes
    for n in names:
        del module._parameters[n]
    module.__class__ = _nf4_class(type(module), names)
    module._nf4_states, module._code_views = {}, {}
    module.nf4_compute_dtype, module.quant_storage = compute_dtype, storage
    for n, (packed, state) in made.items():
        module._store(n, packed)
        module._nf4_states[n] = state
    return module

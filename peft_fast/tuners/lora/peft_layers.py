"""Hugging Face PEFT's own LoRA layers, run on peft_fast's kernels in place (`peft_fast.patch(peft_model)`).

An adopted layer keeps everything of PEFT's (its class in its MRO, parameters, names, merging, adapter management,
files): only `forward` changes, to compute.py's plan-based forward, which reads the same attributes. Its class
becomes `Fast<PEFT class>` (a subclass of PEFT's, so every isinstance check still holds) and `release` puts the
original back. Because PEFT's own methods (set_adapter, merge, ...) do not know about launch plans, an adopted
layer's plan key also holds the PEFT state a plan depends on (active adapters, their DoRA flags, merged).

Adopted: `lora.Linear` and `lora.bnb.Linear4bit` over bases peft_fast has a view for, with plain LoRA or DoRA
adapters; `lora.ParamWrapper` (target_parameters) over a transformers experts module, whose outermost wrapper then
runs the grouped experts forward with every wrapper's LoRA as one grouped op (PEFT adds each expert's B·A to a
weight-sized copy). Anything else (embeddings, convolutions, 8-bit bases, aLoRA/QALoRA/Arrow/VeLoRA variants,
parameters of other modules) is left to PEFT, and `adopt` says why.
"""
from __future__ import annotations

import importlib
import threading
from functools import partial
from typing import Any, Optional

import torch

from ...bases import supported
from ...bases.experts import experts_forward, is_experts_module
from ...batching import AdapterNames
from ...names import BASE_NAME
from ..base_layer import TunerLayer, invalidate_after_load
from .compute import LoraCompute
from .dora import DoraVariant
from .experts import expert_factors, grouped_delta_fn
from .variants import LORA

# Per thread: (the last adapter_names seen, as a tuple, and its AdapterNames): one conversion per forward (every
# layer gets the same list), compared by value so that a list edited in place between forwards is seen, and
# threads running forwards concurrently never see each other's batch.
_BATCH_NAMES = threading.local()


def _then_invalidate(name: str):
    """PEFT's method `name`, then what the layer derived from its adapters dropped (the method changes them)."""
    def method(self, *args, **kwargs):
        result = getattr(super(FastPeftLora, self), name)(*args, **kwargs)
        TunerLayer.invalidate(self)
        return result

    method.__name__ = method.__qualname__ = name
    return method


class FastPeftLora(LoraCompute):
    """The compute of a PEFT LoRA layer replaced by peft_fast's; mixed in before PEFT's class."""

    base_view = TunerLayer.base_view
    plan = TunerLayer.plan
    _batch_key = None  # PEFT's own hooks bring adapter_names to these layers, not peft_fast's batch routing
    __getstate__ = TunerLayer.__getstate__
    rescalable = True  # PEFT's LoraLayer: peft_fast.helpers.rescale_adapter_scale rescales it too

    def variant(self, name: str):
        # PEFT's lora_variant holds its own variant objects; ours live beside them, rebuilt if the adapter changes
        is_dora = bool(self.use_dora.get(name, False))
        entry = self._pf_variants.get(name)
        if entry is None or entry[0] != is_dora:
            entry = self._pf_variants[name] = (is_dora, DoraVariant() if is_dora else LORA)
        return entry[1]

    def plan_key(self, x: torch.Tensor) -> tuple:
        active = tuple(self.active_adapters)
        return (*TunerLayer.plan_key(self, x), active, tuple(self.use_dora.get(a, False) for a in active),
                bool(self.merged_adapters))

    def _clear_caches(self) -> None:
        self._stack_cache = None
        for _, variant in self._pf_variants.values():
            variant.clear()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        TunerLayer.invalidate(self, base=True)
        return result

    # PEFT's own adapter events, which its methods announce to nobody: what was derived from the adapters goes (the
    # mixed-batch stacks, DoRA's cached norms and the deleted adapter's variant, which holds its tensors).
    def update_layer(self, adapter_name, *args, **kwargs):
        result = super().update_layer(adapter_name, *args, **kwargs)
        self._pf_variants.pop(adapter_name, None)
        TunerLayer.invalidate(self)
        return result

    def delete_adapter(self, adapter_name):
        result = super().delete_adapter(adapter_name)
        self._pf_variants.pop(adapter_name, None)
        TunerLayer.invalidate(self)
        return result

    set_scale = _then_invalidate("set_scale")
    scale_layer = _then_invalidate("scale_layer")
    unscale_layer = _then_invalidate("unscale_layer")

    def train(self, mode: bool = True):
        TunerLayer.invalidate(self)  # as peft_fast's own layers: a change of mode refreshes after in-place edits
        return super().train(mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        keys = _VARIANT_KEYS if _VARIANT_KEYS is not None else _variant_kwarg_keys()
        variant_kwargs = {k: kwargs.get(k) for k in keys if kwargs.get(k) is not None}
        if variant_kwargs:  # arguments of PEFT's other variants (aLoRA offsets, ...): PEFT computes those
            return self._pf_original.forward(self, x, *args, **kwargs)
        for k in keys:
            kwargs.pop(k, None)
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            # PEFT's rescale_adapter_scale (and hand edits) replace scaling values with no call to hook: the slots
            # hold them, so a change refreshes them (tensor scalings, of a compiled hotswap, change through events)
            scalings = tuple((k, id(v) if isinstance(v, torch.Tensor) else v) for k, v in self.scaling.items())
            if scalings != self.__dict__.get("_pf_scalings"):
                self._pf_scalings = scalings
                TunerLayer.invalidate(self)
            return self.mixed_batch_forward(x, *args, adapter_names=_batch_names(adapter_names), **kwargs)
        return self.plan(x)(x, *args, **kwargs)


def _variant_kwarg_keys() -> tuple:
    """PEFT's forward arguments for its other variants, read once (adopt reads them): an import per forward would
    break a compiled graph at every layer."""
    global _VARIANT_KEYS
    _VARIANT_KEYS = tuple(getattr(importlib.import_module("peft.tuners.lora.layer"), "VARIANT_KWARG_KEYS", ()))
    return _VARIANT_KEYS


_VARIANT_KEYS: Optional[tuple] = None


def _batch_names(names):
    """PEFT hands every layer of one forward the same adapter_names list: turn it into one AdapterNames (slots and
    batch metadata shared by all layers, as peft_fast's own model does), once per list."""
    if isinstance(names, AdapterNames):
        return names
    key = tuple(names)
    last = getattr(_BATCH_NAMES, "last", None)
    if last is None or last[0] != key:
        slots = tuple(sorted({n for n in key if n != BASE_NAME}))
        last = _BATCH_NAMES.last = (key, AdapterNames(list(key), slots))
    return last[1]


class FastPeftParam:
    """PEFT's lora.ParamWrapper with the grouped experts forward; mixed in before PEFT's class."""

    _batch_key = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:  # PEFT's own refusal
            return self._pf_original.forward(self, x, *args, **kwargs)
        peft_wrapper, chain, module = self._pf_original, {}, self
        while isinstance(module, peft_wrapper):
            if module.disable_adapters and module.merged:  # as PEFT: disabling undoes a merge first
                module.unmerge()
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active and not module.merged and not module.disable_adapters:
                chain[module.parameter_name] = grouped_delta_fn(module, active, partial(expert_factors, module))
            module = module.base_layer
        if not chain:
            return module(x, *args, **kwargs)
        return experts_forward(module, chain, x, *args, **kwargs)


def _innermost(layer):
    while hasattr(layer, "parameter_name") and hasattr(layer, "base_layer"):
        layer = layer.base_layer
    return layer


def _peft_classes() -> dict[type, type]:
    """PEFT's adoptable layer classes -> their Fast subclasses, built once (module attributes: picklable)."""
    if _CLASSES:
        return _CLASSES
    layer = importlib.import_module("peft.tuners.lora.layer")
    originals = [layer.Linear]
    try:
        originals.append(importlib.import_module("peft.tuners.lora.bnb").Linear4bit)
    except (ImportError, AttributeError):  # PEFT without bitsandbytes has no 4-bit layer
        pass
    param_wrapper = getattr(layer, "ParamWrapper", None)
    for original in originals + ([param_wrapper] if param_wrapper is not None else []):
        name = f"Fast{original.__name__}"
        mixin = FastPeftParam if original is param_wrapper else FastPeftLora
        fast = type(name, (mixin, original), {"__module__": __name__, "_pf_original": original})
        globals()[name] = fast
        _CLASSES[original] = fast
    return _CLASSES


_CLASSES: dict[type, type] = {}


def handles(layer) -> bool:
    """A PEFT LoRA layer (adoptable or not)."""
    try:
        return isinstance(layer, importlib.import_module("peft.tuners.lora.layer").LoraLayer)
    except ImportError:
        return False


def adopted(layer) -> bool:
    return isinstance(layer, (FastPeftLora, FastPeftParam))


def adopt(layer) -> Optional[str]:
    """Run `layer` on peft_fast's kernels; None when done (or already), else why it stays PEFT's."""
    if adopted(layer):
        return None
    _variant_kwarg_keys()
    fast = _peft_classes().get(type(layer))
    if fast is None:
        return f"{type(layer).__name__} layers are not accelerated (peft_fast runs LoRA on Linear/Conv1D and 4-bit bases)"
    if issubclass(fast, FastPeftParam):
        if not is_experts_module(_innermost(layer)):
            return f"its parameter belongs to {type(_innermost(layer)).__name__}, not a transformers experts module"
        layer.__class__ = fast
        return None
    if not supported(layer.base_layer):
        return f"its base {type(layer.base_layer).__name__} has no peft_fast view"
    dora = importlib.import_module("peft.tuners.lora.variants").DoraLinearVariant
    others = sorted({type(v).__name__ for v in layer.lora_variant.values() if not isinstance(v, dora)})
    if others:
        return f"its adapters use {', '.join(others)}, which peft_fast does not run"
    layer.__dict__.update(_plans={}, _view=None, _stack_cache=None, _pf_variants={},
                          _pf_load_hook=layer.register_load_state_dict_post_hook(invalidate_after_load))
    layer.__class__ = fast
    return None


def release(layer) -> None:
    """Give `layer` back to PEFT's forward."""
    if not adopted(layer):
        return
    layer.__class__ = layer._pf_original
    if "_pf_load_hook" not in layer.__dict__:  # a parameter wrapper: nothing else was added
        return
    layer._pf_load_hook.remove()
    for key in ("_plans", "_view", "_stack_cache", "_stack_dirty", "_pf_variants", "_pf_scalings", "_pf_load_hook"):
        layer.__dict__.pop(key, None)

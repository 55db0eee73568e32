"""Speeding up Hugging Face PEFT's own models in place, so that Trainer, TRL and Accelerate keep seeing PEFT.

`patch(peft_model)` hands each PEFT adapter layer to the tuner registered for it (a tuner's `peft_layers`, e.g.
tuners/lora/peft_layers.py), which swaps its compute for peft_fast's kernels and keeps PEFT's classes, parameters,
files and adapter management; layers no tuner can run stay PEFT's, with one warning naming them. `unpatch` gives
every layer back. `patch_peft()` does the same for every PEFT model created or loaded inside a `with` block (TRL
builds its model with PEFT's own get_peft_model, which it imported by name): those models stay accelerated after
the block; models created after it are plain PEFT.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
import weakref
from typing import Iterator

import torch.nn as nn

from .tuners import registry
from .tuners.base_layer import TunerLayer  # registered as a BaseTunerLayer, and not one of PEFT's layers


def _peft():
    try:
        return importlib.import_module("peft")
    except ImportError as exc:
        raise ImportError("Speeding up PEFT models needs Hugging Face PEFT (`pip install peft`); peft_fast's own "
                          "models (peft_fast.get_peft_model) need no PEFT.") from exc


def _owner(layer):
    """The registered tuner's `peft_layers` that knows this PEFT layer type, or None."""
    for spec in registry.specs():
        if spec.peft_layers is not None and spec.peft_layers.handles(layer):
            return spec.peft_layers
    return None


_WARNED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()  # what each model was told


def peft_layer_names(model: nn.Module) -> list[str]:
    """Names of the Hugging Face PEFT adapter layers in `model` (none without PEFT installed)."""
    try:
        base_tuner_layer = importlib.import_module("peft.tuners.tuners_utils").BaseTunerLayer
    except ImportError:
        return []
    return [name for name, module in model.named_modules()
            if isinstance(module, base_tuner_layer) and not isinstance(module, TunerLayer)]


def patch_peft_model(model: nn.Module) -> nn.Module:
    """Run the adapter layers of a Hugging Face PEFT model (or any module holding PEFT adapter layers) on peft_fast's
    kernels, in place; returns the model. Outputs and gradients are PEFT's (to rounding on GPUs)."""
    _peft()
    refused: dict[str, list[str]] = {}
    for name in peft_layer_names(model):
        module = model.get_submodule(name)
        owner = _owner(module)
        why = owner.adopt(module) if owner is not None else (
            f"{type(module).__module__.split('.')[-2]} adapters ({type(module).__name__}) have no peft_fast kernels")
        if why is not None:
            refused.setdefault(why, []).append(name)
    told = _WARNED.setdefault(model, set())
    for why, names in refused.items():
        if (why, tuple(names)) in told:
            continue
        told.add((why, tuple(names)))
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(f"peft_fast left {len(names)} layer(s) to PEFT ({shown}): {why}.", stacklevel=2)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Give every adapter layer of `model` back to PEFT's own forward; returns the model."""
    for _, module in model.named_modules():
        owner = _owner(module)
        if owner is not None:
            owner.release(module)
    return model


def patched_layers(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that run on peft_fast's kernels (the rest run as PEFT wrote them)."""
    out = []
    for name, module in model.named_modules():
        owner = _owner(module)
        if owner is not None and owner.adopted(module):
            out.append(name)
    return out


@contextlib.contextmanager
def patch_peft() -> Iterator[None]:
    """Inside the block, every PEFT model that is created or loaded (get_peft_model, PeftModel.from_pretrained, TRL's
    peft_config=...) is patched as it is built. Models built after the block are plain PEFT again."""
    peft_model_cls = _peft().PeftModel
    original = peft_model_cls.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        patch_peft_model(self)

    peft_model_cls.__init__ = init
    try:
        yield
    finally:
        peft_model_cls.__init__ = original

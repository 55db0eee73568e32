"""ModulesToSaveWrapper: a fully trained copy of a module per adapter (PEFT's ``modules_to_save``)."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn

from ..batching import batch_for
from .base_layer import TunerLayer, check_adapter_names

_MIXED_BATCH_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ModulesToSaveWrapper(nn.Module):
    _batch_key = None  # set by the owning TunerModel (batching.py)

    def __init__(self, module_to_save: nn.Module, adapter_name: str, tied: Optional[nn.Module] = None):
        super().__init__()
        if isinstance(module_to_save, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module_to_save)}")
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self.update(adapter_name, tied)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> list[str]:
        return self._active_adapter

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def update(self, adapter_name: str, tied: Optional[nn.Module] = None) -> None:
        """`tied`: the input embedding's copy, whose weight this (tied output layer's) copy shares, as in PEFT
        (ensure_weight_tying); never copied, so no second vocabulary-sized table is allocated."""
        if adapter_name not in self.modules_to_save:
            memo = {id(self.original_module.weight): tied.weight} if tied is not None else None
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module, memo)
        self.original_module.requires_grad_(False)
        if adapter_name in self._active_adapter:
            self.modules_to_save[adapter_name].requires_grad_(True)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else [n for n in adapter_names if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(f"Attempted to set multiple ({names}) adapters at once for modules_to_save.")
        for mod in self.modules_to_save.values():
            mod.requires_grad_(False)
        if not names:
            self._active_adapter = []
            return
        if names[0] not in self.modules_to_save:
            raise ValueError(f"Adapter {names[0]} not found in {sorted(self.modules_to_save.keys())}")
        self.modules_to_save[names[0]].requires_grad_(not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        for name, mod in self.modules_to_save.items():
            mod.requires_grad_(enabled and name in self._active_adapter)

    def delete_adapter(self, adapter_name: str, new_active: Optional[list[str]]) -> None:
        """PEFT's rule: follow the model's new active adapter when this wrapper has it, else none. An active
        adapter that does not change keeps its trainability."""
        if adapter_name not in self.modules_to_save:
            return
        follow = (new_active or [None])[0]
        if follow is None or follow not in self.modules_to_save or follow == adapter_name:
            del self.modules_to_save[adapter_name]
            self._active_adapter = []
            return
        if self._active_adapter[:1] != [follow]:
            self.set_adapter(follow)
        del self.modules_to_save[adapter_name]

    def _passthrough(self) -> bool:
        return self._disable_adapters or not self._active_adapter or self._active_adapter[0] not in self.modules_to_save

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = batch_for(self)
        if adapter_names is None or self._disable_adapters:
            if self._passthrough():
                return self.original_module(*args, **kwargs)
            return self.modules_to_save[self._active_adapter[0]](*args, **kwargs)
        return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)

    # Not traced: the rows are split by name, which torch.compile would otherwise guard on (a recompile for every
    # new mix of adapters, then eager for the whole forward); a graph break here instead.
    @torch.compiler.disable(recursive=False)
    def _mixed_batch_forward(self, *args: Any, adapter_names: list[str], **kwargs: Any):
        # Each row's own adapter's copy, whichever adapter is active; the original for "__base__" and for adapters
        # without a copy here (their modules_to_save did not name this module).
        if not any(name in self.modules_to_save for name in set(adapter_names)):
            return self.original_module(*args, **kwargs)
        if not args:
            raise TypeError(f"A mixed batch through modules_to_save splits the module's first positional argument by "
                            f"rows; {type(self.original_module).__name__} got keyword arguments only.")
        x, *args = args
        check_adapter_names(x, adapter_names)
        if not isinstance(self.original_module, _MIXED_BATCH_TYPES):
            names = ", ".join(t.__name__ for t in _MIXED_BATCH_TYPES)
            raise TypeError(f"Mixed batching is only supported for the following modules: {names}.")
        results: list[Any] = [None] * len(x)
        for name in set(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            mod = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            out = mod(x[rows], *args, **kwargs)
            for k, row in enumerate(rows):
                results[row] = out[k]
        return torch.stack(results)

    def unload(self) -> nn.Module:
        """The module that replaces this wrapper on unload: the active adapter's copy, else the original."""
        if not self._active_adapter or self._active_adapter[0] not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter[0]]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if "_modules" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        if self._passthrough():
            return getattr(self.original_module, name)
        return getattr(self.modules_to_save[self._active_adapter[0]], name)


def inside_adapter_machinery(model: nn.Module, key: str) -> bool:
    """True for modules inside an adapter layer or a ModulesToSaveWrapper (their parts, base_layer, copies, ...)."""
    parts = key.split(".")
    mod = model
    for part in parts[:-1]:
        mod = getattr(mod, part, None) if not part.isdigit() else mod[int(part)]
        if isinstance(mod, (TunerLayer, ModulesToSaveWrapper)):
            return True
    return False

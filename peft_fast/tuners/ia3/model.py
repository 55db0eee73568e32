"""IA3Model: the model with (IA)³ adapters (PEFT's ``IA3Model``), on the shared TunerModel."""
from __future__ import annotations

import copy
import re

import torch

from ...batching import changes_adapters
from ..base_model import TunerModel
from ..modules_to_save import ModulesToSaveWrapper
from .config import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS
from .layer import IA3Conv, IA3Linear


def is_feedforward(config, key: str) -> bool:
    """PEFT's rule: a regex matched against the whole module name, or any listed name the key ends with (a plain
    suffix: "proj" also matches "down_proj")."""
    modules = config.feedforward_modules
    if isinstance(modules, str):
        return re.fullmatch(modules, key) is not None
    return any(key.endswith(name) for name in modules)


class IA3Model(TunerModel):
    prefix = "ia3_"
    layer_cls = IA3Linear
    default_targets = DEFAULT_TARGETS

    @classmethod
    def prepare_config(cls, config, model) -> None:
        if config.feedforward_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in DEFAULT_FEEDFORWARD:
                raise ValueError("Please specify `feedforward_modules` in `peft_config`: there is no default for "
                                 f"model_type={model_type!r} (pass [] when no targeted module is a feedforward one).")
            config.feedforward_modules = set(DEFAULT_FEEDFORWARD[model_type])

    @classmethod
    def layer_for(cls, module, key: str):
        if IA3Conv.adapts(module):  # PEFT's ia3.Conv2d / ia3.Conv3d (not Conv1d, in PEFT either)
            return IA3Conv, IA3Conv.view_for(module, key)
        return super().layer_for(module, key)

    @classmethod
    def target_kwargs(cls, config, key: str) -> dict:
        return {"is_feedforward": is_feedforward(config, key)}

    def after_injection(self, config, seen) -> None:
        config.feedforward_modules = seen.feedforward_modules
        config.fan_in_fan_out = seen.fan_in_fan_out  # the layers correct it to their type, as PEFT does

    @changes_adapters
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add `adapter_name` whose vectors are Σ weight·vector of `adapters` (PEFT's IA3 add_weighted_adapter: it
        targets the union of their modules; a layer takes the sum over the adapters it holds; a name that exists
        already is left as it is)."""
        if adapter_name in self.peft_config:
            return
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist")
        if len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter got {len(adapters)} adapters but {len(weights)} weights.")
        for _, m in self.model.named_modules():
            if isinstance(m, ModulesToSaveWrapper) and sum(a in m.modules_to_save for a in adapters) > 1:
                raise ValueError("Cannot add weighted adapters targeting the same module with modules_to_save.")
        configs = [self.peft_config[a] for a in adapters]
        if len({type(c.target_modules) for c in configs}) > 1 or \
                len({type(c.feedforward_modules) for c in configs}) > 1:
            raise ValueError("All adapter configs should have the same type for target and feedforward modules.")
        config = copy.deepcopy(configs[0])
        config.target_modules = _union([c.target_modules for c in configs])
        config.feedforward_modules = _union([c.feedforward_modules for c in configs])
        self.add_adapter(adapter_name, config)
        with torch.no_grad():
            for _, layer in self.adapter_layers():
                if adapter_name not in layer.ia3_l:
                    continue
                target = layer.ia3_l[adapter_name]
                target.zero_()
                for name, weight in zip(adapters, weights):
                    if name in layer.ia3_l:
                        target += layer.ia3_l[name] * weight
                layer.invalidate()


def _union(values: list):
    """Regexes joined by alternation, name sets united (PEFT's rule for combined adapters)."""
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return set().union(*values)

"""Model surgery: plan which modules an adapter targets, then replace them, with undo on failure."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

from .config import LoraConfig
from .layer import LoraLinear
from .modules_to_save import ModulesToSaveWrapper
from .nf4_linear import NF4Linear
from .quantized import check_4bit_base
from .targets import is_excluded, linear_types, matches_target, no_match_error, pattern_value, resolve_target_modules


@dataclass
class Target:
    key: str  # module path inside the wrapped model
    module: nn.Module  # the module now at that path (a plain linear, or an existing LoraLinear)
    r: int
    alpha: float
    in_features: int
    out_features: int


@dataclass
class Plan:
    config: LoraConfig  # resolved copy: explicit target_modules, SEQ_CLS heads added to modules_to_save
    targets: list[Target]
    save_modules: list[str]  # paths to wrap (or extend) as modules_to_save


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLinear) else module


def _features(module: nn.Module, key: str) -> tuple[int, int]:
    base = _base_of(module)
    if isinstance(base, (nn.Linear, NF4Linear)):
        return base.in_features, base.out_features
    if isinstance(base, linear_types()):  # transformers Conv1D stores weight as [in, out]
        return base.weight.shape[0], base.weight.shape[1]
    raise ValueError(
        f"Target module {key} ({type(base).__name__}) is not supported. peft_fast adapts torch.nn.Linear and "
        "transformers Conv1D layers; narrow target_modules (or use exclude_modules) to skip it."
    )


def plan_adapter(model: nn.Module, config: LoraConfig) -> Plan:
    """Work out everything an adapter will touch, without touching the model."""
    config = copy.deepcopy(config)
    resolve_target_modules(config, model)
    if config.task_type == "SEQ_CLS":
        extra = [h for h in ("classifier", "score") if h not in (config.modules_to_save or [])]
        config.modules_to_save = (config.modules_to_save or []) + extra
    targets: list[Target] = []
    excluded_any = False
    for key, module in model.named_modules():
        if not key or _inside_adapter_machinery(model, key):
            continue
        if is_excluded(config, key):
            excluded_any = excluded_any or matches_target(config, key)
            continue
        if not matches_target(config, key):
            continue
        in_f, out_f = _features(module, key)
        check_4bit_base(_base_of(module), key)
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        targets.append(Target(key, module, r, alpha, in_f, out_f))
    if not targets:
        if excluded_any:
            raise ValueError("All modules were excluded. This is likely unintended. Check your `target_modules` "
                             "and `exclude_modules` configuration.")
        raise no_match_error(config, model)
    save_modules = []
    for name in config.modules_to_save or []:
        for key, module in model.named_modules():
            # PEFT's rule, a plain suffix: "head" also wraps "lm_head", "norm" every "*norm".
            if not key or not key.endswith(name) or _inside_adapter_machinery(model, key):
                continue
            save_modules.append(key)
    return Plan(config, targets, save_modules)


def _inside_adapter_machinery(model: nn.Module, key: str) -> bool:
    """True for modules inside a LoraLinear or a ModulesToSaveWrapper (their lora_A, base_layer, copies, ...)."""
    parts = key.split(".")
    mod = model
    for i, part in enumerate(parts[:-1]):
        mod = getattr(mod, part, None) if not part.isdigit() else mod[int(part)]
        if isinstance(mod, (LoraLinear, ModulesToSaveWrapper)):
            return True
    return False


def _parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_key, _, child = key.rpartition(".")
    return (model.get_submodule(parent_key) if parent_key else model), child


class Undo:
    """A stack of inverse actions, so that a failed operation leaves the model as it was."""

    def __init__(self, model: nn.Module):
        self._steps: list[Callable[[], None]] = []
        self._grad = {p: p.requires_grad for p in model.parameters()}

    def push(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def rollback(self) -> None:
        while self._steps:
            self._steps.pop()()
        for p, flag in self._grad.items():
            p.requires_grad_(flag)


def apply_plan(model: nn.Module, plan: Plan, adapter_name: str, undo: Undo,
               autocast_adapter_dtype: bool = True, init: Optional[object] = None) -> LoraConfig:
    """Create the adapter in every planned place. ``init`` overrides the config's init (e.g. False when loading).
    Returns the config the layers saw (they correct fan_in_fan_out to the layer type, as PEFT does)."""
    config = plan.config
    layer_config = config if init is None else _with_init(config, init)
    for t in plan.targets:
        if isinstance(t.module, LoraLinear):
            _snapshot_base(t.module.base_layer, layer_config, undo)
            active_before = t.module.active_adapters
            # pushed first: update_layer may fail halfway and leave a partial entry behind
            undo.push(lambda m=t.module, a=active_before: (m.delete_adapter(adapter_name), m.set_adapter(a)))
            t.module.update_layer(adapter_name, t.r, t.alpha, layer_config, autocast_adapter_dtype)
            continue
        _snapshot_base(t.module, layer_config, undo)
        new = LoraLinear(t.module, adapter_name, layer_config, t.r, t.alpha, autocast_adapter_dtype)
        parent, child = _parent(model, t.key)
        setattr(parent, child, new)
        undo.push(lambda p=parent, c=child, old=t.module: setattr(p, c, old))
    for key in plan.save_modules:
        module = model.get_submodule(key)
        if isinstance(module, ModulesToSaveWrapper):
            undo.push(lambda m=module, a=module.active_adapters: m.delete_adapter(adapter_name, a))
            module.update(adapter_name)
            continue
        wrapper = ModulesToSaveWrapper(module, adapter_name)
        parent, child = _parent(model, key)
        setattr(parent, child, wrapper)
        undo.push(lambda p=parent, c=child, old=module: setattr(p, c, old))
    return layer_config


def _with_init(config: LoraConfig, init: object) -> LoraConfig:
    new = copy.copy(config)
    new.init_lora_weights = init
    return new


def _snapshot_base(base: nn.Module, config: LoraConfig, undo: Undo) -> None:
    """PiSSA/OLoRA rewrite the base weight: keep a copy so a failure can put it back."""
    init = config.init_lora_weights
    if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        saved = base.weight.data.clone()
        undo.push(lambda b=base, w=saved: setattr(b.weight, "data", w))


def adapter_parameters(model: nn.Module, names: Optional[list[str]] = None) -> list[nn.Parameter]:
    """Parameters of the adapters (all, or those named), found by structure, not by name: a base parameter whose
    name happens to contain "lora_" stays a base parameter."""
    out: list[nn.Parameter] = []
    for _, m in tuner_layers(model):
        dicts = ((m.lora_A, m.lora_B, m.lora_magnitude_vector) if isinstance(m, LoraLinear)
                 else (m.modules_to_save,))
        for d in dicts:
            for key, sub in d.items():
                if names is None or key in names:
                    out += list(sub.parameters())
    return out


def set_adapter_requires_grad(model: nn.Module, names: list[str], flag: bool) -> None:
    for p in adapter_parameters(model, names):
        p.requires_grad_(flag)


def mark_only_adapters_trainable(model: nn.Module, configs: dict[str, LoraConfig], active: list[str]) -> None:
    """PEFT's _mark_only_adapters_as_trainable: freeze all but adapters, module copies and requested biases."""
    keep = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for name in active:
        bias = configs[name].bias
        if bias == "all":
            for n, p in model.named_parameters():
                if n == "bias" or n.endswith(".bias"):
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for m in model.modules():
                if isinstance(m, LoraLinear) and getattr(m.base_layer, "bias", None) is not None:
                    m.base_layer.bias.requires_grad_(True)
    for _, m in tuner_layers(model):  # a wrapped module's original stays frozen, its bias included
        if isinstance(m, ModulesToSaveWrapper):
            m.original_module.requires_grad_(False)


def tuner_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (LoraLinear, ModulesToSaveWrapper)):
            yield name, m


def unload(model: nn.Module, merge: bool, safe_merge: bool = False,
           adapter_names: Optional[list[str]] = None, dequantize: bool = False) -> nn.Module:
    """Replace every adapter layer by its base (merging first if asked) and every wrapper by its module.
    ``dequantize`` (with merge): 4-bit bases become plain nn.Linear holding the exact merged weights, and every
    other 4-bit layer its dequantized nn.Linear."""
    if merge and dequantize:
        from .merging import merge_dequantized

        merge_dequantized([m for _, m in tuner_layers(model) if isinstance(m, LoraLinear)], safe_merge, adapter_names)
    elif merge:
        merge_layers(model, safe_merge, adapter_names)
    for key, m in list(tuner_layers(model)):
        if _inside_adapter_machinery(model, key):
            continue
        parent, child = _parent(model, key)
        setattr(parent, child, m.base_layer if isinstance(m, LoraLinear) else m.unload())
    if merge and dequantize:
        from .merging import dequantize_remaining

        dequantize_remaining(model)
    return model


def merge_layers(model: nn.Module, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
    from .merging import merge_layers as merge_all

    merge_all([m for _, m in tuner_layers(model) if isinstance(m, LoraLinear)], safe_merge, adapter_names)

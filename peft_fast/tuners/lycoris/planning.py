"""The injection plan of a LoHa / LoKr adapter: injection.plan_adapter's rules (targets, exclusions, SEQ_CLS heads,
modules_to_save), with the tuner's own check of which base layers it adapts.

injection.plan_adapter accepts the linear bases of peft_fast's shared views only, and these tuners also adapt
torch's Conv1d and Conv2d (as PEFT's do). The planner is the only difference: get_peft_model and add_adapter plan
here (LycorisModel.add_adapter), and on linear models both planners give the same plan (tested).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from ..base_layer import TunerLayer
from ..injection import Plan, Target, base_of
from ..modules_to_save import ModulesToSaveWrapper
from ..targets import SEQ_CLS_HEADS, is_excluded, matches_target, no_match_error, resolve_target_modules
from .bases import view_for


def plan_targets(model: nn.Module, config, tuner_cls) -> Plan:
    """Everything the adapter will touch, without touching the model; unsupported bases raise a TypeError."""
    config = copy.deepcopy(config)
    resolve_target_modules(config, model, tuner_cls.default_targets)
    tuner_cls.prepare_config(config, model)
    if config.task_type == "SEQ_CLS":
        config.modules_to_save = (config.modules_to_save or []) + \
            [h for h in SEQ_CLS_HEADS if h not in (config.modules_to_save or [])]
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
        base = base_of(module)
        tuner_cls.layer_cls.check_base(base, key)
        view = view_for(base)
        view.check(key)
        targets.append(Target(key, module, view.in_features, view.out_features, tuner_cls.target_kwargs(config, key)))
    if not targets:
        if excluded_any:
            raise ValueError("All modules were excluded. This is likely unintended. Check your `target_modules` "
                             "and `exclude_modules` configuration.")
        raise no_match_error(config, model)
    save_modules = [key for name in config.modules_to_save or [] for key, _ in model.named_modules()
                    if key and key.endswith(name) and not _inside_adapter_machinery(model, key)]
    return Plan(config, targets, save_modules)


def _inside_adapter_machinery(model: nn.Module, key: str) -> bool:
    """A module inside an adapter layer or a modules_to_save wrapper (its base_layer, its copies, ...)."""
    mod = model
    for part in key.split(".")[:-1]:
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part, None)
        if isinstance(mod, (TunerLayer, ModulesToSaveWrapper)):
            return True
    return False

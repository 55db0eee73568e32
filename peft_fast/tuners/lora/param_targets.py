"""Which parameters a LoraConfig's `target_parameters` names, and where their LoRA wrappers (experts.py) go: PEFT's
matching and nesting rules, checked before the model changes."""
from __future__ import annotations

import torch.nn as nn

from ...bases.nf4_experts import is_nf4_experts, stack_codes
from ..base_layer import TunerLayer
from .experts import LoraParam, ParamView, innermost


def _matches(full: str, names: list[str]) -> bool:
    return full in names or any(full.endswith(f".{n}") for n in names)


def plan_parameters(model: nn.Module, config, module_targets: list[str], target_kwargs) -> list:
    """injection.Target for every parameter `config.target_parameters` names, PEFT's way: a name matches a
    parameter's full name or its end after a dot; the parameters of one module are wrapped in the order the module
    registers them (so the first is innermost), and a later adapter joins the existing wrappers."""
    from ..injection import Target, inside_adapter_machinery

    names = sorted(set(config.target_parameters or ()))
    if not names:
        return []
    init = config.init_lora_weights
    # before anything changes (PiSSA would rewrite a base)
    if not (isinstance(init, bool) or init in ("gaussian", "orthogonal")):
        raise ValueError(f"init_lora_weights={init!r} needs a base weight matrix; target_parameters supports True, "
                         "False and 'gaussian' ('orthogonal' on 2-D parameters).")
    for pname, _ in model.named_parameters(recurse=False):
        if _matches(pname, names):
            raise ValueError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                             f"'{pname}').")
    targets = []
    for key, module in model.named_modules():
        if not key or inside_adapter_machinery(model, key):
            continue
        adapted = isinstance(module, TunerLayer) and not isinstance(module, LoraParam)
        base = module.base_layer if adapted else innermost(module)
        chain = []  # parameter names of the existing wrappers, innermost first
        m = module
        while isinstance(m, LoraParam):
            chain.insert(0, m.parameter_name)
            m = m.base_layer
        stacks = list(getattr(base, "_nf4_names", ()))  # 4-bit stacks: by their names, not their codes' parameters
        own = [p for p, _ in base.named_parameters(recurse=False) if p not in map(stack_codes, stacks)] + stacks
        matched = [p for p in own if _matches(f"{key}.{p}", names)]
        if not matched:
            continue
        if adapted or key in module_targets:
            raise ValueError(f"Trying to wrap an `nn.Parameter` of layer '{key}' of type {type(base).__name__}, which "
                             "is not a valid target. Make sure that this layer is not also targeted with "
                             "`target_modules`.")
        final = chain + [p for p in matched if p not in chain]
        for p in matched:
            check_param_target(base, key, p)
            view = ParamView(module, p)
            if init == "orthogonal" and view.num_experts != 1:  # (PEFT draws factors without the expert axis)
                raise ValueError(f"init_lora_weights='orthogonal' needs a 2-D parameter; {key}.{p} holds "
                                 f"{view.num_experts} experts: use True, False or 'gaussian' there.")
            depth = len(final) - 1 - final.index(p)
            kwargs = {**target_kwargs(config, f"{key}.{p}"), "parameter_name": p}
            targets.append(Target(key, module, view.in_features, view.out_features, kwargs, LoraParam,
                                  key + ".base_layer" * depth))
    return targets


def check_param_target(base: nn.Module, key: str, parameter_name: str) -> None:
    if is_nf4_experts(base) and parameter_name in base._nf4_names:
        return
    param = getattr(base, parameter_name, None)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"target_parameters: {key} has no parameter {parameter_name!r}.")
    if not param.dtype.is_floating_point:  # e.g. a 4-bit layer's packed codes
        raise ValueError(f"target_parameters: {key}.{parameter_name} holds {param.dtype} values, not weights LoRA "
                         f"can adapt ({type(base).__name__}); target the module with target_modules instead.")
    if param.dim() not in (2, 3):
        raise ValueError(f"target_parameters: {key}.{parameter_name} has {param.dim()} dimensions; LoRA adapts 2-D "
                         "and 3-D parameters.")

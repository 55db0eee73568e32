"""Model surgery for every tuner: plan which modules an adapter targets, then replace them, with undo on failure."""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch.nn as nn

from ..progress import progress
from .base_layer import TunerLayer
from .merging import dequantize_remaining, merge_dequantized, merge_layers, model_dtype
from .modules_to_save import ModulesToSaveWrapper, inside_adapter_machinery
from .trainable_tokens import TrainableTokensWrapper
from .targets import (
    TASK_HEADS,
    compact_target_modules,
    is_excluded,
    matches_target,
    no_match_error,
    resolve_target_modules,
)
from .tied import Ties, plan_ties


@dataclass
class Target:
    key: str  # module path inside the wrapped model
    module: nn.Module  # the module now at that path (a base layer, or an existing layer of this tuner)
    in_features: int
    out_features: int
    kwargs: dict[str, Any] = field(default_factory=dict)  # the tuner's per-layer values (LoRA: r, lora_alpha)
    layer_cls: Optional[type] = None  # the layer class that adapts this base (the tuner's layer_for)
    # Where the layer's tensors sit in the files, when not at `key` (a parameter's wrapper nested under others).
    file_key: Optional[str] = None
    tied_to: Optional[str] = None  # the input embedding whose factors this layer's are (ensure_weight_tying)


@dataclass
class Plan:
    config: Any  # resolved copy: explicit target_modules, the task's heads added to modules_to_save
    targets: list[Target]
    save_modules: list[str]  # paths to wrap (or extend) as modules_to_save
    ties: Ties = field(default_factory=Ties)  # layers tied to the input embedding's copy or factors


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TunerLayer) else module


def plan_adapter(model: nn.Module, config, tuner_cls, file_keys: Optional[set] = None) -> Plan:
    """Work out everything an adapter will touch, without touching the model. `tuner_cls` (a TunerModel class)
    gives the per-layer values (`target_kwargs`); its layer class, which bases it adapts (`view_for`).
    `file_keys`: when loading, the file's keys (without `base_model.model.`), which decide tied layers."""
    config = copy.deepcopy(config)
    ties = plan_ties(config, model, file_keys)
    resolve_target_modules(config, model, tuner_cls.default_targets)
    compact_target_modules(config, [k for k, _ in model.named_modules()])
    tuner_cls.prepare_config(config, model)
    targets: list[Target] = []
    excluded_any = False
    for key, module in model.named_modules():
        if not key or inside_adapter_machinery(model, key) or ties.is_tied_target(key):
            continue
        if is_excluded(config, key):
            excluded_any = excluded_any or matches_target(config, key)
            continue
        if not matches_target(config, key):
            continue
        if isinstance(module, TrainableTokensWrapper):
            raise ValueError(f"Target module {key} trains token rows (an adapter's trainable_token_indices) and "
                             "cannot also be an adapter target, as in PEFT: train its tokens or adapt it, not both.")
        layer_cls, view = tuner_cls.layer_for(base_of(module), key)  # the tuner says which bases it adapts
        view.check(key)
        targets.append(Target(key, module, view.in_features, view.out_features, tuner_cls.target_kwargs(config, key),
                              layer_cls))
    targets += tuner_cls.plan_parameters(model, config, [t.key for t in targets])
    targets += _tied_targets(model, config, ties, targets, tuner_cls)
    if not targets:
        if getattr(config, "target_parameters", None):
            raise ValueError("No `target_modules` passed but also no `target_parameters` found: "
                             f"target_parameters={config.target_parameters} matched no parameter (a name matches a "
                             "parameter's full name or its end after a dot, e.g. 'experts.gate_up_proj').")
        if excluded_any:
            raise ValueError("All modules were excluded. This is likely unintended. Check your `target_modules` "
                             "and `exclude_modules` configuration.")
        raise no_match_error(config, model)
    _warn_unmatched_patterns(config, [k for t in targets for k in (t.key, t.file_key) if k])
    save_modules, places = [], set()
    for name in dict.fromkeys(config.modules_to_save or []):
        # Every place a module is reachable, as PEFT lists them: a module shared by two blocks, or an alias, gets a
        # copy at each place named. A place is a parent module's attribute: a block registered twice holds its
        # children at one place (one wrapper, as in PEFT, which state dicts list under the first path).
        for key, module in model.named_modules(remove_duplicate=False):
            # PEFT's rule, a plain suffix: "head" also wraps "lm_head", "norm" every "*norm".
            if not key or not key.endswith(name) or inside_adapter_machinery(model, key) or key in save_modules:
                continue
            parent, _, attr = key.rpartition(".")
            place = (id(model.get_submodule(parent)), attr)
            if place in places:
                continue
            places.add(place)
            if isinstance(module, TunerLayer):  # PEFT's error; its copies would hold the other adapters' layers
                raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module)}: {key} "
                                f"carries an adapter already. Leave {name!r} out of modules_to_save, or out of the "
                                "other adapter's target_modules.")
            save_modules.append(key)
    return Plan(config, targets, save_modules, ties)


def _tied_targets(model: nn.Module, config, ties: Ties, targets: list[Target], tuner_cls) -> list[Target]:
    """The layers that share the input embedding's weight, planned after the others as PEFT creates them last: an
    output layer gets factors that will be views of the embedding's (its own scaling, as in PEFT); another
    embedding sharing the table (T5's encoder and decoder ones) gets its own adapter, as in PEFT."""
    if not ties.targets:
        return []
    out = []
    for key, module in model.named_modules():
        if not key or inside_adapter_machinery(model, key) or not ties.is_tied_target(key):
            continue
        layer_cls, view = tuner_cls.layer_for(base_of(module), key)
        view.check(key)
        if not getattr(layer_cls, "ties_to_embedding", False):
            out.append(Target(key, module, view.in_features, view.out_features, tuner_cls.target_kwargs(config, key),
                              layer_cls))
            continue
        if tuner_cls.rewrites_base(config):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight, which {key} "
                             "shares with the input embedding (ensure_weight_tying=True): use another "
                             "initialisation, or ensure_weight_tying=False.")
        source = next((t for t in targets if t.key == ties.embedding), None)
        if source is None:
            raise ValueError(f"ensure_weight_tying=True ties {key} to the input embedding {ties.embedding}, which "
                             "this adapter does not adapt (exclude_modules or layers_to_transform left it out): "
                             "adapt the embedding, or set ensure_weight_tying=False.")
        out.append(Target(key, module, view.in_features, view.out_features,
                          tuner_cls.tied_kwargs(config, key, source.kwargs), layer_cls, tied_to=ties.embedding))
    return out


def _warn_unmatched_patterns(config, targeted: list[str]) -> None:
    """PEFT's warning for rank_pattern / alpha_pattern keys that match no targeted module (a typo leaves the
    default rank or alpha, silently otherwise)."""
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None) or {}
        unmatched = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", k) for k in targeted))
        if unmatched:
            warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: "
                          f"{unmatched}", RuntimeWarning, stacklevel=4)


def add_task_heads(config, task_type: Optional[str]) -> None:
    """The heads PEFT's model for `task_type` trains in full (a classifier, QA outputs), added to modules_to_save
    as PEFT adds them (a name already there is listed twice, as in PEFT's adapter_config.json), before targets are
    matched, so that they are not adapted."""
    heads = TASK_HEADS.get(task_type, ())
    if heads and hasattr(config, "modules_to_save"):
        config.modules_to_save = list(config.modules_to_save or []) + list(heads)


def parent_of(model: nn.Module, key: str) -> tuple[nn.Module, str]:
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


def apply_plan(model: nn.Module, plan: Plan, adapter_name: str, undo: Undo, tuner_cls,
               autocast_adapter_dtype: bool = True, init: Optional[object] = None):
    """Create the adapter in every planned place. `init` overrides the config's initialisation (e.g. False when
    loading). Returns the config the layers saw (a tuner may correct it per layer type, as PEFT does)."""
    config = plan.config if init is None else tuner_cls.with_init(plan.config, init)
    tuner_cls.check_init(config)
    for t in plan.targets:
        layer_cls = t.layer_cls or tuner_cls.layer_cls
        module = model.get_submodule(t.key)  # an earlier target may have wrapped it (a parameter's wrapper)
        if tuner_cls.rewrites_base(config):
            _snapshot_base(base_of(module), undo)
        home = layer_cls.adapter_home(module, t)
        if home is not None:
            active_before = home.active_adapters
            # pushed first: update_layer may fail halfway and leave a partial entry behind
            undo.push(lambda m=home, a=active_before: (m.delete_adapter(adapter_name), m.set_adapter(a)))
            home.update_layer(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, **t.kwargs,
                              **_tie_source(model, t, adapter_name))
            continue
        if isinstance(module, TunerLayer) and not layer_cls.wraps(module):
            raise ValueError(f"Target module {t.key} already carries a {type(module).__name__} adapter; one module "
                             "cannot hold adapters of two types.")
        new = layer_cls(module, adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, **t.kwargs,
                        **_tie_source(model, t, adapter_name))
        parent, child = parent_of(model, t.key)
        setattr(parent, child, new)
        undo.push(lambda p=parent, c=child, old=module: setattr(p, c, old))
    for key in plan.save_modules + plan.ties.save:
        module = model.get_submodule(key)
        # a tied output layer uses the embedding's copy (wrapped just before, in save_modules)
        tied = model.get_submodule(plan.ties.embedding).modules_to_save[adapter_name] if key in plan.ties.save \
            else None
        if isinstance(module, ModulesToSaveWrapper):
            undo.push(lambda m=module, a=module.active_adapters: m.delete_adapter(adapter_name, a))
            module.update(adapter_name, tied)
            continue
        wrapper = ModulesToSaveWrapper(module, adapter_name, tied)
        parent, child = parent_of(model, key)
        setattr(parent, child, wrapper)
        undo.push(lambda p=parent, c=child, old=module: setattr(p, c, old))
    return config


def _tie_source(model: nn.Module, target: Target, adapter_name: str) -> dict[str, nn.Module]:
    """{"tied": the input embedding's adapter layer} for a layer tied to it, else nothing."""
    if target.tied_to is None:
        return {}
    embedding = model.get_submodule(target.tied_to)
    if adapter_name not in getattr(embedding, "lora_embedding_A", {}):
        raise ValueError(f"ensure_weight_tying: {target.key} is tied to {target.tied_to}, which holds no LoRA "
                         f"embedding adapter {adapter_name!r}.")
    return {"tied": embedding}


def _snapshot_base(base: nn.Module, undo: Undo) -> None:
    """An initialisation that rewrites the base weight (PiSSA, OLoRA): keep a copy so a failure can put it back."""
    saved = base.weight.data.to("cpu", copy=True)  # in host memory: loading a PiSSA adapter onto a 7B model on a
    # GPU would otherwise hold a second copy of every targeted weight there
    undo.push(lambda b=base, w=saved, device=base.weight.device: setattr(b.weight, "data", w.to(device)))


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, (TunerLayer, ModulesToSaveWrapper)):
            yield name, m


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, TunerLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, TunerLayer):
            yield name, m


def adapter_parameters(model: nn.Module, names: Optional[list[str]] = None) -> list[nn.Parameter]:
    """Parameters of the adapters (all, or those named), found by structure, not by name: a base parameter whose
    name happens to contain "lora_" stays a base parameter."""
    out: list[nn.Parameter] = []
    for _, m in tuner_layers(model):
        if isinstance(m, TunerLayer):
            out += m.adapter_parameters(names)
        else:
            for key, sub in m.modules_to_save.items():
                if names is None or key in names:
                    out += list(sub.parameters())
    return out


def set_adapter_requires_grad(model: nn.Module, names: list[str], flag: bool) -> None:
    for p in adapter_parameters(model, names):
        p.requires_grad_(flag)


def mark_only_adapters_trainable(model: nn.Module, configs: dict, active: list[str]) -> None:
    """PEFT's _mark_only_adapters_as_trainable: freeze all but adapters, module copies and requested biases."""
    keep = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for name in active:
        bias = getattr(configs[name], "bias", "none")
        if bias == "all":
            for n, p in model.named_parameters():
                if n == "bias" or n.endswith(".bias"):
                    p.requires_grad_(True)
        elif bias.endswith("_only"):  # "lora_only": the biases of the layers this tuner adapts
            for _, m in adapter_layers(model):
                if getattr(m.base_layer, "bias", None) is not None:
                    m.base_layer.bias.requires_grad_(True)
    for _, m in tuner_layers(model):  # a wrapped module's original stays frozen, its bias included
        if isinstance(m, ModulesToSaveWrapper):
            m.original_module.requires_grad_(False)


def unload(model: nn.Module, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
           dequantize: bool = False, progressbar: bool = False) -> nn.Module:
    """Replace every adapter layer by its base (merging first if asked) and every wrapper by its module.
    `dequantize` (with merge): 4-bit bases become plain nn.Linear holding the exact merged weights, and every
    other 4-bit layer its dequantized nn.Linear. `progressbar`: a tqdm bar counting the layers merged."""
    layers = [m for _, m in adapter_layers(model)]
    dtype = model_dtype(model) if merge and dequantize else None  # for dequantized layers that do not record theirs
    bar = progress(len(layers), progressbar and merge, "Unloading and merging model")
    try:
        if merge and dequantize:
            merge_dequantized(layers, safe_merge, adapter_names, bar, dtype)
        elif merge:
            merge_layers(layers, safe_merge, adapter_names, bar)
    finally:
        bar.close()
    # The outermost layers, all found before the first replacement (which makes a nested wrapper look outermost).
    outer = [(key, m) for key, m in tuner_layers(model) if not inside_adapter_machinery(model, key)]
    for key, m in outer:
        parent, child = parent_of(model, key)
        base = m.unload() if not isinstance(m, TunerLayer) else m.base_layer
        while isinstance(base, TunerLayer):  # wrappers nested over one module (several parameters targeted)
            base = base.base_layer
        setattr(parent, child, base)
    if merge and dequantize:
        dequantize_remaining(model, dtype)
    return model

"""Which modules an adapter config targets: PEFT's matching rules, plus helpful errors when nothing matches."""
from __future__ import annotations

import difflib
import re
from typing import Optional

import torch.nn as nn

from ..bases import linear_types
from .base_layer import TunerLayer

# The heads PEFT's task models (PeftModelForSequenceClassification, ...) train in full as modules_to_save.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
# PEFT shortens a list this long to the suffixes telling targets apart (MIN_TARGET_MODULES_FOR_OPTIMIZATION)
MIN_TARGETS_TO_COMPACT = 20


class NoMatchingPeftModuleError(ValueError):
    """PEFT's error type for a target_modules that matches nothing (a ValueError, as in PEFT)."""


def resolve_target_modules(config, model: nn.Module, defaults: dict[str, list[str] | str]):
    """Expand ``None`` (the tuner's `defaults` by model type) and ``"all-linear"`` into explicit targets, as PEFT
    does before injection."""
    targets = config.target_modules
    if targets is None and getattr(config, "target_parameters", None):
        config.target_modules = set()  # PEFT: parameters alone; no default modules beside them
    elif targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(
                f"target_modules is None and there is no default for model_type={model_type!r}: "
                "pass target_modules (a list of module names, a regex, or 'all-linear')."
            )
        default = defaults[model_type]
        config.target_modules = default if isinstance(default, str) else set(default)  # gemma4's is a regex
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        names = {n for n, m in model.named_modules() if isinstance(m, linear_types() + (TunerLayer,))}
        exclude: set[str] = set()
        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        if out is not None:
            exclude |= {n for n, m in model.named_modules() if m is out}
        elif config.task_type in TASK_HEADS:
            # PEFT excludes a SEQ_CLS head; with TOKEN_CLS and QUESTION_ANS it adapts the head, then fails making it
            # a modules_to_save. Here every task's head is trained in full, as the task asks, and not adapted.
            for head in TASK_HEADS[config.task_type]:
                mod = getattr(model, head, None)
                if mod is not None:
                    exclude |= {n for n, m in model.named_modules() if m is mod}
                    break
        for prefix, m in model.named_modules():  # never nest an adapter layer inside an existing one
            if isinstance(m, TunerLayer):
                exclude |= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
        config.target_modules = names - exclude
    return config


def compact_target_modules(config, keys: list[str]) -> None:
    """Shorten a long target list as PEFT does before injecting (`all-linear` on any real model lists every layer's
    path): each target becomes the shortest suffix of its name that no untargeted module's name ends with, so the
    same modules match and adapter_config.json lists what PEFT's lists. `keys`: every module name of the model. IA3
    keeps its list, as in PEFT (its feedforward_modules must stay a subset of it)."""
    targets = config.target_modules
    if isinstance(targets, str) or len(targets or ()) < MIN_TARGETS_TO_COMPACT or config.peft_type == "IA3":
        return
    targets = set(targets)

    def suffixes(name: str) -> list[str]:  # the shortest first
        parts = name.split(".")
        return [".".join(parts[i:]) for i in reversed(range(len(parts)))]

    others = [k for k in keys if k not in targets and not any(k.endswith("." + t) for t in targets)]
    taken = {s for k in others for s in suffixes(k)}
    chosen: set[str] = set()
    for name, options in sorted(((t, suffixes(t)) for t in targets), key=lambda item: item[1]):  # PEFT's order
        if any(name.endswith("." + c) for c in chosen):
            continue
        free = [s for s in options if s not in taken and s not in chosen]
        if free:
            chosen.add(free[0])
    if chosen and len(chosen) < len(targets):
        config.target_modules = chosen


def is_excluded(config, key: str) -> bool:
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return True
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return True
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return True
    return False


def matches_target(config, key: str) -> bool:
    """PEFT's check_target_module_exists, minus exclusions (see ``is_excluded``)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.layers_to_transform
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if not (found and using_layers):
        return found
    patterns = config.layers_pattern
    match: Optional[re.Match] = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: first pattern whose regex matches the end of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def no_match_error(config, model: nn.Module) -> NoMatchingPeftModuleError:
    # the model's own layers, not the parts of adapters already there (base_layer, lora_A.<name>, ...)
    inside = {f"{k}.{s}" for k, m in model.named_modules() if k and isinstance(m, TunerLayer)
              for s, _ in m.named_modules() if s}
    names = [n for n, _ in model.named_modules() if n and n not in inside]
    linear_names = [n for n, m in model.named_modules() if isinstance(m, linear_types()) and n not in inside]
    targets = config.target_modules
    wanted = [targets] if isinstance(targets, str) else sorted(targets)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names} or {n.rsplit(".", 1)[-1] for n in names})
    hints: list[str] = []
    for t in wanted:
        hints += difflib.get_close_matches(t.rsplit(".", 1)[-1], suffixes, n=3, cutoff=0.5)
    hint = sorted(set(hints)) or suffixes[:12]
    extra = ""
    if config.layers_to_transform is not None:
        extra = (f" Note that layers_to_transform={config.layers_to_transform} (layers_pattern="
                 f"{config.layers_pattern!r}) restricts the match to those layer indices; check them too.")
    return NoMatchingPeftModuleError(
        f"Target modules {wanted} not found in the base model. Please check the target modules and try again. "
        f"Closest module names: {hint}. Linear layers in this model end in: {suffixes[:20]}.{extra}"
    )

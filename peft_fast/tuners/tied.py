"""Adapters on tied embeddings (`tie_word_embeddings`: the output layer shares the input embedding's weight).

With LoRA's `ensure_weight_tying=True`, as in PEFT, the adapter keeps the two layers tied:
- `modules_to_save` naming either layer trains one copy of the embedding, which the output layer uses as well;
- `target_modules` naming either layer adapts the embedding, and the output layer gets LoRA factors that are views
  of the embedding's (its A is the embedding's Bᵀ, its B the embedding's Aᵀ), so both add the same delta.
PEFT rewrites the config to do this (the embedding's path joins the list, the tied layers' names leave it), so
adapter_config.json reads as PEFT's. Without the flag PEFT warns when a tied layer is part of an adapter; so does
this module.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from .base_layer import TunerLayer
from .modules_to_save import inside_adapter_machinery
from .trainable_tokens import TrainableTokensWrapper

EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES


@dataclass
class Ties:
    """What an adapter ties to the input embedding (paths inside the model)."""
    embedding: Optional[str] = None
    save: list[str] = field(default_factory=list)  # layers whose modules_to_save copy is the embedding's copy
    targets: list[str] = field(default_factory=list)  # layers whose LoRA factors are views of the embedding's

    def is_tied_target(self, key: str) -> bool:
        return key in self.targets or any(key.endswith("." + t) for t in self.targets)


def unwrapped(module: nn.Module) -> nn.Module:
    if isinstance(module, TrainableTokensWrapper):
        return module.original_module
    return module.base_layer if isinstance(module, TunerLayer) else module


def input_embedding(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        return None
    return next((k for k, m in model.named_modules() if m is embedding), None) if embedding is not None else None


def tied_to(model: nn.Module, embedding: Optional[str]) -> list[str]:
    """Paths of the layers that share the input embedding's weight, when the model's config ties them (PEFT reads
    `tie_word_embeddings` and the model's tied-weight keys; the shared parameter says the same)."""
    if embedding is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return []
    weight = getattr(unwrapped(model.get_submodule(embedding)), "weight", None)
    return [k for k, m in model.named_modules() if k and k != embedding and not inside_adapter_machinery(model, k)
            and weight is not None and getattr(unwrapped(m), "weight", None) is weight]


def plan_ties(config, model: nn.Module, file_keys: Optional[set] = None) -> Ties:
    """PEFT's _check_tied_modules, on the adapter's (copied) config before its targets are resolved: rewrites
    `modules_to_save` / `target_modules` as PEFT does and says which layers to tie; warns as PEFT warns.

    `file_keys` (loading: the file's keys without `base_model.model.`): PEFT's rewrite puts the embedding's own
    path into the saved config (GPT-2's transformer.wte, T5's shared), which its rule does not recognise when
    loading, and a config a user wrote can name the same path without any tie. So when loading, that path counts
    too, and a layer is tied only where the file holds its adapter (what the saved model had)."""
    embedding = input_embedding(model)
    tied = tied_to(model, embedding)
    own = embedding if file_keys is not None else None
    names = list(getattr(config, "modules_to_save", None) or [])
    to_save = any(m.split(".")[-1] in EMBEDDING_NAMES or m == own for m in names)
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        rewritten = own is not None and targets.endswith(f"|^{re.escape(own)}$)")
        in_targets = rewritten or any(re.fullmatch(targets, n) for n in EMBEDDING_NAMES)
    else:
        in_targets = any(m.split(".")[-1] in EMBEDDING_NAMES or m == own for m in targets or ())
    if not getattr(config, "ensure_weight_tying", False):
        if (to_save or in_targets) and tied:
            how = ("but `ensure_weight_tying` is not set to True" if hasattr(config, "ensure_weight_tying") else
                   "but no implementation exists to tie the adapters")
            warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, " + how +
                          ". This can lead to complications, for example when merging the adapter or converting your "
                          "model to formats other than safetensors. Check the discussion here: "
                          "https://github.com/huggingface/peft/issues/2777", stacklevel=5)
        return Ties()
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      stacklevel=5)
        if getattr(config, "trainable_token_indices", None) is not None:
            warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings="
                          "False). Weight tying will not be applied for trainable_token_indices.", stacklevel=5)
        return Ties()
    if file_keys is not None:
        tied = [k for k in tied if _saved(k, file_keys, to_save)]
        if not tied:
            return Ties()
    if to_save:
        if embedding not in names:
            names.append(embedding)
        config.modules_to_save = _without_tied(names, tied)
        return Ties(embedding, save=tied)
    if in_targets:
        if isinstance(targets, str):  # the embedding is adapted (its factors are the ones saved and trained)
            config.target_modules = rf"(?:{targets}|^{re.escape(embedding)}$)"
        else:
            config.target_modules = set(_without_tied(list(targets) + [embedding], tied))
        return Ties(embedding, targets=tied)
    warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                  "`modules_to_save` or `target_modules`", stacklevel=5)
    return Ties()


def _saved(key: str, file_keys: set, whole: bool) -> bool:
    """Whether the file holds the adapter of layer `key`: its trained copy (`whole`) or its factors."""
    prefix = key + "."
    return any(f.startswith(prefix) and (("lora_" not in f and ".base_layer." not in f) if whole else "lora_" in f)
               for f in file_keys)


def _without_tied(names: list[str], tied: list[str]) -> list[str]:
    """PEFT's rule: for each tied layer, the first name that matches its path leaves the list."""
    names = list(names)
    for key in tied:
        for name in names:
            if re.match(rf"(^|.*\.){name}($|\..*)", key):
                names.remove(name)
                break
    return names

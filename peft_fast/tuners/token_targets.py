"""Which layers an adapter's `trainable_token_indices` wraps (PEFT's set_additional_trainable_modules), worked out
before anything changes, and the wrapping itself, with undo steps.

PEFT's rules: a list of indices names the model's input embedding (by its path, else "embed_tokens"); a dict maps
layer names, matched as suffixes of module paths, to indices. Where the model ties its output layer to the input
embedding (`tie_word_embeddings`), that layer gets a wrapper tied to the embedding's rows, unless the dict gives the
two layers different indices (then each trains its own rows). A layer also in `target_modules` or `modules_to_save`
is refused, as in PEFT; so are indices outside the layer, before anything changes (PEFT fails halfway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .base_layer import TunerLayer
from .injection import Undo, inside_adapter_machinery, parent_of
from .tied import input_embedding, tied_to, unwrapped
from .modules_to_save import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensWrapper

DELTA_KEY = "token_adapter.trainable_tokens_delta"  # the file key of a wrapper's rows, after its path


@dataclass
class TokenTarget:
    key: str  # module path
    indices: list[int]
    shape: tuple[int, int]  # of the trainable rows: (len(indices), embedding dim)
    tied_to: Optional[str] = None  # the input embedding's path, for an output layer sharing its weight


def plan_tokens(model: nn.Module, plan) -> list[TokenTarget]:
    """The layers the adapter planned by `plan` (injection.Plan) gives trainable tokens, embeddings first; raises
    what PEFT raises (and what it would fail on later) without touching the model."""
    for key in plan.save_modules:
        if isinstance(model.get_submodule(key), TrainableTokensWrapper):
            raise ValueError(f"modules_to_save names {key}, which already has trainable tokens (an earlier adapter's"
                             " trainable_token_indices): train its tokens or the whole layer, not both.")
    spec = getattr(plan.config, "trainable_token_indices", None)
    if spec is None:
        return []
    embedding = input_embedding(model)
    layers = dict(spec) if isinstance(spec, dict) else {embedding or "embed_tokens": spec}
    for name in layers:
        if name in (plan.config.modules_to_save or []):
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but not '
                             "both.")
    tied = tied_to(model, embedding)
    skip, mismatch = set(), False
    if len(layers) > 1 and tied:
        keys = [n for n in layers if embedding.endswith(n) or any(t.endswith(n) or n in t.split(".") for t in tied)]
        if len(keys) >= 2:
            mismatch = any(layers[k] != layers[keys[0]] for k in keys[1:])
            if mismatch and getattr(plan.config, "ensure_weight_tying", False):
                given = ", ".join(f"{k}: {layers[k]}" for k in keys)
                raise ValueError("Cannot ensure weight tying when different token indices are specified for tied "
                                 f"layers. Conflicting layers: {given}. Please use the same indices for all tied "
                                 "layers or set ensure_weight_tying=False.")
            skip = set() if mismatch else set(keys) & set(tied)
    planned = {t.key for t in plan.targets}
    targets: list[TokenTarget] = []
    for name, indices in layers.items():
        if name in skip:
            continue
        keys = [k for k, _ in model.named_modules(remove_duplicate=False)
                if k.endswith(name) and not inside_adapter_machinery(model, k)]
        if not keys:
            raise ValueError(f"Target modules {{{name!r}}} not found in the base model. Please check the target "
                             "modules and try again. (trainable_token_indices names layers by the end of their path.)")
        targets += [_target(model, k, indices, planned, plan.save_modules) for k in keys]
    own = next((t.indices for t in targets if t.key == embedding), None)
    if own is not None and not mismatch:
        done = {t.key for t in targets}
        targets += [_target(model, k, own, planned, plan.save_modules, embedding) for k in tied if k not in done]
    return targets


def _target(model: nn.Module, key: str, indices: list[int], planned: set, save_modules: list,
            tied_to: Optional[str] = None) -> TokenTarget:
    module = model.get_submodule(key)
    if key in planned or isinstance(module, TunerLayer):
        raise TypeError(f"trainable_token_indices cannot be applied to modules of type {type(module)} ({key} is "
                        "also an adapter target): train the embedding's tokens or adapt the layer, not both.")
    if key in save_modules or (isinstance(module, ModulesToSaveWrapper)
                               and not isinstance(module, TrainableTokensWrapper)):
        raise ValueError(f"{key} is in modules_to_save (trained fully): train its tokens or the whole layer, not "
                         "both.")
    if isinstance(module, TrainableTokensWrapper) and module.tied != (tied_to is not None):
        raise ValueError(f"{key} already has trainable tokens {'tied' if module.tied else 'not tied'} to the input "
                         "embedding's; every adapter must tie it the same way (give the tied layers the same "
                         "indices in every adapter, or different ones in every adapter).")
    base = unwrapped(module)
    if not isinstance(base, (nn.Embedding, nn.Linear)):
        raise TypeError(f"trainable_token_indices applies to embedding layers (nn.Embedding) and the output layers "
                        f"tied to them (nn.Linear); {key} is a {type(base).__name__}.")
    rows, dim = base.weight.shape
    bad = [i for i in indices if i >= rows]
    if bad:
        raise IndexError(f"trainable_token_indices for {key}: index {bad[0]} is out of range for its {rows} tokens.")
    return TokenTarget(key, list(indices), (len(indices), dim), tied_to)


def apply_tokens(model: nn.Module, targets: list[TokenTarget], adapter_name: str, undo: Undo,
                 autocast_adapter_dtype: bool = True) -> None:
    """Wrap (or extend) every planned layer; `undo` takes the inverse steps."""
    for t in targets:
        module = model.get_submodule(t.key)
        if isinstance(module, TrainableTokensWrapper):
            undo.push(lambda m=module, a=module.active_adapters: m.remove(adapter_name, a))
            module.update(adapter_name, t.indices, autocast_adapter_dtype)
            continue
        tied = model.get_submodule(t.tied_to).token_adapter if t.tied_to else None
        wrapper = TrainableTokensWrapper(module, adapter_name, t.indices, tied, autocast_adapter_dtype)
        parent, child = parent_of(model, t.key)
        setattr(parent, child, wrapper)
        undo.push(lambda p=parent, c=child, old=module: setattr(p, c, old))


def token_file_shapes(model: nn.Module, plan) -> dict[str, tuple[int, int]]:
    """File key (after `base_model.model.`) -> shape of the rows an adapter planned by `plan` saves. A tied layer
    saves nothing: its rows are the embedding's."""
    return {f"{t.key}.{DELTA_KEY}": t.shape for t in plan_tokens(model, plan) if t.tied_to is None}

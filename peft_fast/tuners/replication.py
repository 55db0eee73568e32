"""PEFT's ``layer_replication``: before an adapter is injected, the decoder's layer list is rebuilt from ranges of
the original layers ([[0, 4], [2, 5]] over 5 layers gives layers 0 1 2 3 2 3 4), each entry a copy that shares
every parameter with the layer it copies, so the replicas cost no weight memory and each gets adapters of its own.
As in PEFT: the list is found at ``model(.model)*.layers`` (Llama and most decoders), ``.encoder.layer`` (BERT) or
``.h`` (Falcon), the copies' ``layer_idx`` follow their new position, the config's ``num_hidden_layers`` becomes
the new count, and every adapter whose config asks replicates the layers it finds (a second such adapter
replicates the replicated list again). A failure after the rebuild puts the original list back."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from .injection import tuner_layers


def _layer_list(model: nn.Module) -> tuple[nn.Module, nn.Module, str, nn.ModuleList]:
    inner = model
    while hasattr(inner, "model"):
        inner = inner.model
    if hasattr(inner, "bert"):
        inner = inner.bert
    for owner, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        layers = getattr(owner, attr, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return inner, owner, attr, layers
    raise ValueError("layer_replication: could not locate the layers attribute in the model (model(.model)*.layers, "
                     ".encoder.layer or .h). Expected Llama, Bert or Falcon compatible architectures.")


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of `layer` whose parameters are the original's (buffers and plain attributes are copied)."""
    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for pname, param in module.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def _check_map(layer_map, n: int) -> list[tuple[int, int]]:
    ranges = []
    for item in layer_map:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in item)
        if not ok or not 0 <= item[0] < item[1] <= n:
            raise ValueError(f"layer_replication: each entry must be a [start, end) range of layer indices with "
                             f"0 <= start < end <= {n} (the model's layers), got {item!r} in {layer_map!r}.")
        ranges.append((item[0], item[1]))
    return ranges


def replicate_layers(model: nn.Module, layer_map: Sequence) -> Callable[[], None]:
    """Rebuild `model`'s layer list from `layer_map` (see the module docstring); returns the undo."""
    inner, owner, attr, layers = _layer_list(model)
    ranges = _check_map(layer_map, len(layers))
    sources = [i for start, end in ranges for i in range(start, end)]  # the layer each new one copies
    kept = set(sources)
    dropped = [i for i in range(len(layers)) if i not in kept and next(tuner_layers(layers[i]), None) is not None]
    if dropped:
        # PEFT drops them, and with them those adapters' factors: silently wrong outputs for the earlier adapters.
        raise ValueError(f"layer_replication {list(layer_map)!r} leaves out layer(s) {dropped} of the model's current "
                         f"{len(layers)}, which carry adapters: their factors would be lost. The layers were "
                         "replicated already (or adapted before): give a map over the current layers that keeps "
                         "them, or add this adapter to a fresh copy of the base model.")
    new = []
    for i in sources:
        clone = _shared_copy(layers[i])
        for module in clone.modules():  # transformers' attention layers index their cache by it
            if hasattr(module, "layer_idx"):
                module.layer_idx = len(new)
        new.append(clone)
    config = getattr(inner, "config", None)
    had_count = config is not None and hasattr(config, "num_hidden_layers")
    old_count = config.num_hidden_layers if had_count else None
    for clone, source in zip(new, sources):
        if sources.count(source) > 1:
            # Every module of such a copy shares its weights with another copy's: merging refuses them
            # (merging.check_mergeable), whichever adapters come later; deep copies, pickles and a later
            # replication's copies keep the mark. A map that copies no layer twice shares nothing.
            for module in clone.modules():
                module.shared_by_replicas = True
    setattr(owner, attr, nn.ModuleList(new))
    if had_count:  # transformers' decoders run config.num_hidden_layers of their layers
        config.num_hidden_layers = len(new)

    def restore() -> None:
        setattr(owner, attr, layers)
        if had_count:
            config.num_hidden_layers = old_count

    return restore


def keys_beyond_layers(model: nn.Module, tensors: dict, prefix: str = "") -> list[str]:
    """The keys of `tensors` (module paths under `prefix`) that address a layer past the end of the model's layer
    list and repeat, value for value, the same key of a layer it has: a file saved after a later adapter
    replicated the layers again holds an earlier adapter's factors for those copies too (they share the factors of
    the layer they copy). Loading that adapter alone rebuilds fewer layers, and PEFT drops those keys; any other
    key past the end is left to the file checks, which refuse it."""
    try:
        _, _, _, layers = _layer_list(model)
    except ValueError:
        return []
    path = next((k for k, m in model.named_modules() if m is layers), None)
    if path is None:
        return []
    head = f"{prefix}{path}."
    out = []
    for key, value in tensors.items():
        if not key.startswith(head):
            continue
        index, _, rest = key[len(head):].partition(".")
        if not (index.isdigit() and int(index) >= len(layers) and rest):
            continue
        twins = (tensors.get(f"{head}{i}.{rest}") for i in range(len(layers)))
        if any(t is not None and t.shape == value.shape and torch.equal(t, value) for t in twins):
            out.append(key)
    return out

"""Adapter tensors under PEFT's file keys, for every tuner: the adapter name is stripped on save and put back on
load; each layer class names its own keys (TunerLayer.adapter_state / param_key / expected_state). Tensors that all
layers of a model share (TunerLayer.shared_adapter_dicts) are saved once, under `base_model.<dict>`, as PEFT does."""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..batching import changes_adapters
from .base_layer import TunerLayer
from .modules_to_save import ModulesToSaveWrapper
from .tied import EMBEDDING_NAMES
from .token_targets import DELTA_KEY, plan_tokens, token_file_shapes
from .trainable_tokens import TrainableTokensWrapper

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # PEFT's key for a tensor held by the tuner model itself (VeRA's "base_model.vera_A")


def adapter_tensors(model: nn.Module, adapter_name: str, configs: dict,
                    save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """File-ready tensors of one adapter of the adapted model `model` (keys get PEFT's `base_model.model.`);
    `save_embedding_layers` as in PEFT (`_embedding_tables`)."""
    config = configs.get(adapter_name)
    bias = getattr(config, "bias", "none")
    out: dict[str, torch.Tensor] = {}
    for key, m in model.named_modules():
        if isinstance(m, TunerLayer):
            for suffix, v in m.adapter_state(adapter_name).items():
                out[f"{PREFIX}{key}.{suffix}"] = v
            # PEFT saves the base bias of every adapted layer with a "lora_only" adapter, targeted by it or not.
            if bias.endswith("_only") and getattr(m.base_layer, "bias", None) is not None:
                out[f"{PREFIX}{key}.base_layer.bias"] = m.base_layer.bias
        elif isinstance(m, TrainableTokensWrapper):
            if not m.tied and adapter_name in m.modules_to_save:  # a tied layer's rows are the embedding's
                out[f"{PREFIX}{key}.{DELTA_KEY}"] = m.token_adapter.trainable_tokens_delta[adapter_name]
        elif isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
            for k, v in m.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{key}.{k}"] = v
    out.update(_shared_tensors(model, adapter_name))
    out.update(_embedding_tables(model, config, adapter_name, save_embedding_layers))
    if bias == "all":
        # PEFT: every bias of the model minus other adapters' ones, this adapter's name dropped from the key.
        others = [n for n in configs if n != adapter_name]
        for k, v in model.state_dict().items():
            parts = k.split(".")
            if parts[-1] != "bias" or any(o in parts for o in others):
                continue
            key = ".".join(p for p in parts if p != adapter_name)
            out.setdefault(f"{PREFIX}{key}", v)
    return {k: v.detach() for k, v in out.items()}




def _embedding_tables(model: nn.Module, config, adapter_name: str,
                      save: bool | str = "auto") -> dict[str, torch.Tensor]:
    """PEFT's save_embedding_layers: the model's input and output embedding tables, saved with the adapter (loading
    writes them back into the base, as PEFT's load_state_dict does). "auto": when target_modules names an embedding
    layer (not with trainable_token_indices, whose point is to save a few rows rather than the tables), or when
    the vocabulary was resized since the base model's config (`_vocab_resized`). An adapted table is saved under
    `<path>.base_layer.<param>`, a plain one under `<path>.<param>`, one a wrapper trains (modules_to_save, trainable
    tokens) under PEFT's keys of its original table."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        targeted = targets != "all-linear" and any(
            re.fullmatch(targets, k) for k, _ in model.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_NAMES))
    else:
        targeted = bool(targets) and any(e in targets for e in EMBEDDING_NAMES)
    if save == "auto":
        save = (targeted and getattr(config, "trainable_token_indices", None) is None) or _vocab_resized(model, config)
    if not save or not hasattr(model, "get_input_embeddings"):
        return {}
    out: dict[str, torch.Tensor] = {}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        path = next((k for k, m in model.named_modules() if m is layer), None)
        if path is None:
            continue
        if isinstance(layer, TunerLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            out.update({f"{PREFIX}{path}.base_layer.{k}": v for k, v in layer.base_layer.state_dict().items()})
        elif targeted:
            continue
        elif isinstance(layer, TrainableTokensWrapper):  # PEFT's keys for the table under trained rows
            out.update({f"{PREFIX}{path}.token_adapter.base_layer.{k}": v
                        for k, v in layer.token_adapter.base_layer.state_dict().items()})
            rows = layer.token_adapter.trainable_tokens_delta
            if adapter_name in rows:  # (a tied layer's: the embedding's rows, which PEFT writes here too)
                out[f"{PREFIX}{path}.{DELTA_KEY}"] = rows[adapter_name]
        elif isinstance(layer, ModulesToSaveWrapper):  # the original table, and this adapter's copy once more
            out.update({f"{PREFIX}{path}.original_module.{k}": v
                        for k, v in layer.original_module.state_dict().items()})
            if adapter_name in layer.modules_to_save:
                out.update({f"{PREFIX}{path}.modules_to_save.{k}": v
                            for k, v in layer.modules_to_save[adapter_name].state_dict().items()})
        elif type(layer) in (nn.Linear, nn.Embedding):
            out.update({f"{PREFIX}{path}.{k}": v for k, v in layer.state_dict().items()})
    return out


def _vocab_resized(model: nn.Module, config) -> bool:
    """Whether the model's vocabulary differs from its base model's config (PEFT's test for resized embeddings).
    The base config is read from its folder, or from the local Hub cache: saving makes no network call."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if not vocab or not model_id:
        return False
    if os.path.isfile(os.path.join(model_id, "config.json")):
        folder = model_id
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_id, "config.json")
        except Exception:  # not a repo id
            return False
        if not isinstance(cached, str):
            return False
        folder = os.path.dirname(cached)
    try:
        base_vocab = type(model.config).from_pretrained(folder).vocab_size
    except Exception:
        return False
    return vocab != base_vocab


def _embedding_table_key(key: str, model: nn.Module) -> bool:
    """A saved table of the model's input or output embedding (`_embedding_tables`): plain, or under the wrapper
    that trains it whole or some of its rows (`original_module`, `modules_to_save`, `token_adapter.base_layer`),
    which a plan may not have made yet."""
    if not hasattr(model, "get_input_embeddings"):
        return False
    path, _, param = _base_key(key.removeprefix(PREFIX)).rpartition(".")
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        base = layer.original_module if isinstance(layer, ModulesToSaveWrapper) else layer
        if isinstance(base, (nn.Linear, nn.Embedding)) and param in dict(base.named_parameters(recurse=False)):
            if any(m is layer for k, m in model.named_modules(remove_duplicate=False) if k == path):
                return True
    return False


def _base_table_key(key: str, bases: dict) -> bool:
    """A saved base weight of an adapted (or planned) embedding or output layer (`_embedding_tables`); `bases`: the
    base module of every such layer, by path."""
    path, _, rest = key.removeprefix(PREFIX).rpartition(".base_layer.")
    return bool(rest) and "." not in rest and isinstance(bases.get(path), (nn.Linear, nn.Embedding))


def _ignored_table(key: str, model: nn.Module) -> bool:
    """A base table saved for a layer that no adapter of `model` adapts (PEFT saves the tables of every adapted
    embedding/output layer with an adapter that names embed_tokens, also one only another adapter adapts): PEFT's
    load ignores it, and so does this one."""
    path, _, rest = key.removeprefix(PREFIX).rpartition(".base_layer.")
    if not rest or "." in rest:
        return False
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return isinstance(module, (nn.Linear, nn.Embedding)) and not isinstance(module, TunerLayer)


def _shared_dicts(layers) -> dict[str, tuple[str, nn.Module]]:
    """Dict name -> (path of the first layer holding it, the dict) for every shared per-adapter dict."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for path, layer in layers:
        for name in layer.shared_adapter_dicts:
            found.setdefault(name, (path, getattr(layer, name)))
    return found


def _persistent(container: nn.Module, adapter_name: str) -> bool:
    return adapter_name not in container._non_persistent_buffers_set


def _shared_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    layers = [(k, m) for k, m in model.named_modules() if isinstance(m, TunerLayer)]
    return {SHARED_PREFIX + name: container[adapter_name]
            for name, (_, container) in _shared_dicts(layers).items()
            if adapter_name in container and _persistent(container, adapter_name)}


def expected_file_tensors(model: nn.Module, plan, tuner_cls) -> dict[str, tuple[int, ...]]:
    """File key -> shape that an adapter with this plan must provide (before the model is touched)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan.targets:
        for suffix, shape in (t.layer_cls or tuner_cls.layer_cls).expected_state(t, plan.config).items():
            shapes[f"{PREFIX}{t.file_key or t.key}.{suffix}"] = shape
    for key in plan.save_modules + plan.ties.save:
        module = model.get_submodule(key)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        for k, v in module.state_dict().items():
            shapes[f"{PREFIX}{key}.{k}"] = tuple(v.shape)
    shapes.update({PREFIX + k: shape for k, shape in token_file_shapes(model, plan).items()})
    shared = tuner_cls.layer_cls.expected_shared_state(model, plan)
    shapes.update({k: shape for k, shape in shared.items() if shape is not None})
    return shapes


def check_file_tensors(tensors: dict[str, torch.Tensor], model: nn.Module, plan, tuner_cls, source: str) -> None:
    """Raise a ValueError naming every problem, so nothing is loaded from a file that does not fit."""
    tensors = {k if k.startswith(SHARED_PREFIX) else PREFIX + k: v for k, v in tensors.items()}
    expected = expected_file_tensors(model, plan, tuner_cls)
    skipped = {k for k, shape in tuner_cls.layer_cls.expected_shared_state(model, plan).items() if shape is None}
    # A tied layer's rows are the embedding's; PEFT saves them again under its path with the tables (resized vocab)
    skipped |= {f"{PREFIX}{t.key}.{DELTA_KEY}" for t in plan_tokens(model, plan) if t.tied_to is not None}
    model_state = {_base_key(PREFIX + k): v for k, v in model.state_dict().items()}
    bases = {k: m.base_layer for k, m in model.named_modules() if isinstance(m, TunerLayer)}
    bases.update({t.key: t.module.base_layer if isinstance(t.module, TunerLayer) else t.module for t in plan.targets})
    tables = {k for k in tensors
              if k not in expected and (_base_table_key(k, bases) or _embedding_table_key(k, model))}
    skipped |= {k for k in tensors if k not in expected and k not in tables and _ignored_table(k, model)}
    problems: list[str] = []
    unknown = [k for k in tensors if k not in expected and k not in skipped and k not in tables
               and not ("bias" in k and _base_key(k) in model_state)]
    if unknown:
        problems.append(f"{len(unknown)} key(s) match no adapter layer of this model, e.g. {unknown[:3]}")
    missing = [k for k in expected if k not in tensors]
    if missing:
        problems.append(f"{len(missing)} adapter key(s) are missing, e.g. {missing[:3]}")
    for k, shape in expected.items():
        if k in tensors and tuple(tensors[k].shape) != shape:
            problems.append(f"{k} has shape {tuple(tensors[k].shape)} but this model needs {shape}")
    for k in tables:
        base = model_state.get(_base_key(k))
        if base is not None and tuple(base.shape) != tuple(tensors[k].shape):
            problems.append(f"{k} has shape {tuple(tensors[k].shape)} but the model's is {tuple(base.shape)} (a "
                            "vocabulary resized for training: resize the base's embeddings the same way first, "
                            "model.resize_token_embeddings(n))")
    for k, v in tensors.items():
        if k not in expected and k not in tables and "bias" in k and _base_key(k) in model_state:
            if tuple(model_state[_base_key(k)].shape) != tuple(v.shape):
                problems.append(f"{k} has shape {tuple(v.shape)} but the model's is {tuple(model_state[_base_key(k)].shape)}")
    if problems:
        raise ValueError(f"Adapter weights in {source} do not fit this model (nothing was loaded): "
                         + "; ".join(problems[:6]) + ". Was the adapter trained on a different base model or config?")


def _base_key(key: str) -> str:
    """The key of a base-model tensor whether or not its module is wrapped (adapter layer, trainable tokens or
    modules_to_save, whose copies PEFT saves as ``<path>.modules_to_save.bias`` under bias="all")."""
    key = key.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".").replace(".original_module.", ".")
    return re.sub(r"\.modules_to_save\.([^.]+\.)?(?=[^.]+$)", ".", key)


@changes_adapters
def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str,
                         source: str = "the adapter") -> None:
    """Copy file-format tensors into an existing adapter's parameters of the adapted model `model`, all or nothing:
    every tensor is resolved, checked and converted before the first copy, and a failure while copying puts back
    what was already copied. Non-finite values load (as in PEFT) with one warning for the adapter."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    layers = {k: m for k, m in model.named_modules() if isinstance(m, TunerLayer)}
    wrappers = {k: m for k, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    planned, touched, nonfinite = [], set(), []
    with torch.no_grad():
        for file_key, value in tensors.items():
            key = file_key[len(PREFIX):] if file_key.startswith(PREFIX) else file_key
            if _ignored_table(key, model) or (key.endswith("." + DELTA_KEY) and getattr(
                    wrappers.get(key.removesuffix("." + DELTA_KEY)), "tied", False)):  # (check_file_tensors)
                continue
            target, layer = _resolve(key, adapter_name, layers, wrappers)
            if target is None:  # a shared tensor the model does not persist: not loaded, as load_state_dict skips it
                continue
            dest = params.get(target, buffers.get(target))
            if dest is None:  # a base bias saved from an unwrapped module, now under an adapter layer (or vice versa)
                alt = target.replace(".base_layer.", ".") if ".base_layer." in target else \
                    target.rpartition(".")[0] + ".base_layer." + target.rpartition(".")[2]
                dest = params.get(alt, buffers.get(alt))
            if dest is None:  # a tied weight (GPT-2's lm_head is its wte), which named_parameters lists once
                dest = _tied(model, target)
            if dest is None:
                raise ValueError(f"Adapter key {file_key} matches no parameter of the model (looked for {target}).")
            planned.append((dest, _converted(file_key, value, dest)))
            if layer is not None:
                touched.add(layer)
            if value.is_floating_point() and not torch.isfinite(value.float() if value.element_size() == 1
                                                               else value).all():  # float8: no isfinite kernel
                nonfinite.append(file_key)
        backup = [(dest, dest.detach().clone()) for dest, _ in planned]
        try:
            for dest, value in planned:
                dest.copy_(value)
        except BaseException:
            for dest, old in backup:
                dest.copy_(old)
            raise
    for layer in touched:
        layer.invalidate()
    if nonfinite:
        warnings.warn(f"Adapter {adapter_name!r} ({source}) holds NaN or inf in {len(nonfinite)} tensor(s), e.g. "
                      f"{nonfinite[0]}: it loads as PEFT loads it, but its outputs will not be finite, and "
                      "merge_adapter(safe_merge=True) refuses it.", stacklevel=3)


def _tied(model: nn.Module, target: str) -> Optional[torch.Tensor]:
    try:
        return model.get_parameter(target)
    except AttributeError:
        return None


def _converted(file_key: str, value, dest: torch.Tensor) -> torch.Tensor:
    """`value` as `dest` holds it (dtype, device), or a ValueError naming the key: only dense real tensors of
    `dest`'s shape are copied."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"Adapter key {file_key} holds a {type(value).__name__}, not a tensor.")
    if value.layout != torch.strided:
        raise ValueError(f"Adapter key {file_key} holds a {value.layout} tensor; adapter weights are dense tensors.")
    if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int8, torch.int16, torch.int32,
                                                                              torch.int64, torch.uint8)):
        raise ValueError(f"Adapter key {file_key} holds {value.dtype} values, which {dest.dtype} cannot take.")
    if tuple(value.shape) != tuple(dest.shape):
        raise ValueError(f"Adapter key {file_key} has shape {tuple(value.shape)}, the model's parameter "
                         f"{tuple(dest.shape)}.")
    value = value.to(dtype=dest.dtype, device=dest.device)
    if _is_dtensor(dest):  # a parameter sharded by FSDP2: every rank read the whole file and keeps its own shard
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, dest.device_mesh, dest.placements, src_data_rank=None)
    return value


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _resolve(key: str, adapter_name: str, layers: dict, wrappers: dict) -> tuple[Optional[str], object]:
    """(model parameter name, the adapter layer it belongs to or None) for a file key; (None, layer) for a shared
    tensor that the model does not persist."""
    if key.startswith(SHARED_PREFIX):
        shared = _shared_dicts(layers.items()).get(key[len(SHARED_PREFIX):])
        if shared is not None:
            path, container = shared
            layer = layers[path]
            # The first layer's path is where named_buffers() lists a module shared by every layer.
            return (f"{path}.{key[len(SHARED_PREFIX):]}.{adapter_name}" if _persistent(container, adapter_name)
                    else None), layer
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        layer = layers.get(path)
        if layer is not None:
            inner = layer.param_key(".".join(parts[i:]), adapter_name)
            if inner is not None:
                return f"{path}.{inner}", layer
    for path, wrapper in wrappers.items():
        if isinstance(wrapper, TrainableTokensWrapper):
            if key == f"{path}.{DELTA_KEY}":
                return f"{key}.{adapter_name}", None
            continue
        if key.startswith(f"{path}.original_module."):
            return key, None
        if key.startswith(f"{path}.modules_to_save."):
            return f"{path}.modules_to_save.{adapter_name}.{key[len(path) + 17:]}", None
        if key.startswith(path + "."):
            return f"{path}.modules_to_save.{adapter_name}.{key[len(path) + 1:]}", None
    return key, None

"""PEFT's state-dict functions for a PeftModel (or the adapted model inside it): adapter tensors under PEFT's file
keys, and loading such tensors into an existing adapter; the base model's tensors under the original model's keys,
and loading those.

Sharded models (FSDP2): parameters are DTensors, and `get_peft_model_state_dict` gathers each adapter tensor
whole, which is a collective call: every rank must make it, in the same order (as `save_pretrained` does).
`state_dict=` takes the tensors from a state dict gathered beforehand instead (Accelerate's and TRL's way:
`save_pretrained(dir, state_dict=accelerator.get_state_dict(model))`), without touching the model's values.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys

from .batching import PREPARE_LOCK, SERVING
from .loading import convert_v4_layout
from .sharding import is_sharded
from .tuners.base_layer import TunerLayer
from .tuners.base_model import TunerModel
from .tuners.file_keys import PREFIX, _resolve, adapter_tensors, load_adapter_tensors
from .tuners.modules_to_save import ModulesToSaveWrapper


def _unwrap(model: nn.Module, adapter_name: Optional[str] = None) -> tuple[nn.Module, dict, bool]:
    """(the adapted model, its configs, whether it is wrapped in a PeftModel); with `adapter_name`, refuses a model
    without that adapter (PEFT raises KeyError) rather than giving it no tensors."""
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, TunerModel):  # a PeftModel
        inner, configs, wrapped = tuner.model, tuner.peft_config, True
    else:
        configs = model.__dict__.get("peft_config")  # set by inject_adapter_in_model
        inner, configs, wrapped = model, configs if isinstance(configs, dict) else {}, False
    if adapter_name is not None and adapter_name not in configs:
        if not configs:
            raise ValueError(f"{type(model).__name__} holds no peft_fast adapter (a Hugging Face PEFT model takes "
                             "peft's own get_peft_model_state_dict / set_peft_model_state_dict).")
        raise KeyError(f"No adapter named {adapter_name!r}; the model has {sorted(configs)}.")
    return inner, configs, wrapped


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """File-ready tensors of one adapter. Keys of a PeftModel get PEFT's ``base_model.model.`` prefix; those of a
    model adapted by inject_adapter_in_model are its own module names, as PEFT writes them. ``state_dict``: take
    the values from it (keys as ``model.state_dict()``'s) instead of from the model's parameters.
    ``save_embedding_layers``: also the input and output embedding tables; "auto" (PEFT's rule) when an embedding
    layer is a target, or the vocabulary differs from the base model's config."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    inner, configs, wrapped = _unwrap(model, adapter_name)
    tensors = adapter_tensors(inner, adapter_name, configs, save_embedding_layers)
    if state_dict is not None:
        tensors = _from_state_dict(inner, tensors, state_dict, adapter_name, wrapped)
    tensors = {k: _whole(v) for k, v in tensors.items()}
    return tensors if wrapped else {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _from_state_dict(inner: nn.Module, tensors: dict, state_dict: dict, adapter_name: str, wrapped: bool) -> dict:
    layers = {k: m for k, m in inner.named_modules() if isinstance(m, TunerLayer)}
    wrappers = {k: m for k, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    prefix = PREFIX if wrapped else ""
    out, missing = {}, []
    for file_key, own in tensors.items():
        name, _ = _resolve(file_key.removeprefix(PREFIX), adapter_name, layers, wrappers)
        if name is None:  # a tensor the model does not persist (rebuilt from the config): the model's own
            out[file_key] = own
            continue
        for key in (prefix + name, name, PREFIX + name):
            if key in state_dict:
                out[file_key] = state_dict[key]
                break
        else:
            missing.append(prefix + name)
    if missing:
        raise ValueError(f"save_pretrained(state_dict=...): the state dict lacks {len(missing)} tensor(s) of adapter "
                         f"{adapter_name!r}, e.g. {missing[0]!r}; pass the model's full state dict (as "
                         "model.state_dict() or accelerator.get_state_dict(model) give it).")
    return out


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> _IncompatibleKeys:
    """Copy file-format tensors into an existing adapter's parameters (all or nothing; sharded parameters keep
    their shard). Keys as `model.state_dict()` names them (`lora_A.default.weight`) are taken too, as in PEFT.
    Returns torch's load result, as PEFT: `missing_keys` lists the model's state-dict entries not loaded (the
    base's, and the adapter's that the dict lacks); tensors that do not fit raise instead."""
    inner, configs, wrapped = _unwrap(model, adapter_name)
    # keys of a model transformers v5 laid out differently, as PEFT converts them here too
    _, peft_model_state_dict = convert_v4_layout(inner, configs[adapter_name], peft_model_state_dict, adapter_name)
    layers = {k: m for k, m in inner.named_modules() if isinstance(m, TunerLayer)}
    wrappers = {k: m for k, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    file_key_of = {}  # the model's name of each adapter tensor -> its file key
    for file_key in adapter_tensors(inner, adapter_name, configs, save_embedding_layers=False):
        name, _ = _resolve(file_key.removeprefix(PREFIX), adapter_name, layers, wrappers)
        if name is not None:
            file_key_of[name] = file_key
    tensors, loaded = {}, set()
    for key, value in peft_model_state_dict.items():
        name = key.removeprefix(PREFIX)
        key = file_key_of.get(name, key)  # a state-dict name: the file key it stands for
        tensors[key] = value
        resolved, _ = _resolve(key.removeprefix(PREFIX), adapter_name, layers, wrappers)
        loaded.add(resolved)
    load_adapter_tensors(inner, tensors, adapter_name)
    prefix = PREFIX if wrapped and inner is not model else ""
    return _IncompatibleKeys([k for k in model.state_dict() if k.removeprefix(prefix) not in loaded], [])


def _original_paths(inner: nn.Module) -> tuple[dict[str, str], set[str]]:
    """(module path in the adapted model -> its path in the original model, for the modules that hold base
    tensors; the paths of adapter layers and wrappers, whose own direct tensors are the adapter's). What the
    adapters added (factors, copies, token rows) has no entry. Walked through the live modules, as PEFT does, so
    that a module whose own name is `base_layer` or `original_module` is not mistaken for a wrapper's infix."""
    from .tuners.trainable_tokens import TrainableTokensWrapper

    paths: dict[str, str] = {}
    owned: set[str] = set()

    def visit(module: nn.Module, path: str, original: str) -> None:
        paths[path] = original
        join = (lambda n: f"{path}.{n}") if path else (lambda n: n)
        if isinstance(module, TrainableTokensWrapper):
            owned.add(path)
            owned.add(join("token_adapter"))
            visit(module.token_adapter.base_layer, join("token_adapter.base_layer"), original)
        elif isinstance(module, ModulesToSaveWrapper):
            owned.add(path)
            visit(module.original_module, join("original_module"), original)
        elif isinstance(module, TunerLayer):
            owned.add(path)
            visit(module.base_layer, join("base_layer"), original)
        else:
            for name, child in module._modules.items():
                if child is not None:
                    visit(child, join(name), f"{original}.{name}" if original else name)

    visit(inner, "", "")
    return paths, owned


def _base_keys(inner: nn.Module) -> dict[str, str]:
    """The adapted model's state-dict key -> the original model's key, for every base tensor (4-bit layers'
    quantization state included): a key belongs to the deepest module path it extends, and is the adapter's when
    that is an adapter layer or wrapper (its factors, copies and token rows sit in modules the walk never enters)."""
    paths, owned = _original_paths(inner)
    out = {}
    for key in inner.state_dict(keep_vars=True):
        parts = key.split(".")
        owner = next(".".join(parts[:cut]) for cut in range(len(parts) - 1, -1, -1)
                     if ".".join(parts[:cut]) in paths)
        if owner in owned:
            continue
        rest = ".".join(parts[len(owner.split(".")) if owner else 0:])
        out[key] = f"{paths[owner]}.{rest}" if paths[owner] else rest
    return out


def _holds_peft_layers(model: nn.Module) -> bool:
    """A Hugging Face PEFT model (peft_fast.patch keeps its classes): PEFT's own functions know its layers."""
    from .peft_interop import peft_layer_names

    return bool(peft_layer_names(model))


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's get_base_model_state_dict: the base model's tensors under the original model's keys (no
    `base_layer` / `original_module` infixes, no adapter tensors), e.g. to save or compare the base after FSDP
    wrapping."""
    if _holds_peft_layers(model):
        import peft

        return peft.get_base_model_state_dict(model)
    inner, _, _ = _unwrap(model)
    state = inner.state_dict()
    return {original: state[key] for key, original in _base_keys(inner).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """PEFT's set_base_model_state_dict: load tensors keyed as in the original model into the adapted model's base
    (counterpart of get_base_model_state_dict). Returns (missing_keys, unexpected_keys); with `strict`, either
    raises RuntimeError before anything is loaded."""
    if _holds_peft_layers(model):
        import peft

        return peft.set_base_model_state_dict(model, state_dict, strict=strict)
    inner, _, _ = _unwrap(model)
    to_peft = {original: key for key, original in _base_keys(inner).items()}
    unexpected = [k for k in state_dict if k not in to_peft]
    missing = [k for k in to_peft if k not in state_dict]
    if strict and (missing or unexpected):
        msgs = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + (
            [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else [])
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(msgs))
    with SERVING.changing(), PREPARE_LOCK:  # (mixed batches in flight finish on the old weights)
        inner.load_state_dict({to_peft[k]: v for k, v in state_dict.items() if k in to_peft}, strict=False)
    return _IncompatibleKeys(missing, unexpected)

"""Hot-swapping LoRA adapters in place (PEFT's ``peft.utils.hotswap``), so that a ``torch.compile``'d model serves
a new adapter without recompiling.

``prepare_model_for_compiled_hotswap`` pads every adapter to one rank and turns each scaling into a 0-d tensor
(``LoraLinear.adapter_args`` folds such a scaling into B, so the compiled graph never holds its value).
``hotswap_adapter`` then copies a new adapter's weights into the existing parameters and ``fill_``s the scalings:
same tensors, same shapes, new values. Every check runs before anything is copied, so a refused swap leaves the
model exactly as it was.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn as nn

from ...batching import changes_adapters
from ...config import as_config
from ...loading import read_adapter
from ..targets import pattern_value
from .config import LoraConfig
from .experts import LoraParam
from .layer import LoraLinear, variant_for

# Config fields that change a layer's output but live outside the state dict (PEFT's list for LoRA).
CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
PREFIX = "base_model.model."
_PARTS = (("lora_A", "weight"), ("lora_B", "weight"), ("lora_B", "bias"))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under any ``torch.compile`` wrappers (``OptimizedModule._orig_mod``)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _is_compiled(model: nn.Module) -> bool:
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """Every LoRA layer; parameter wrappers (target_parameters) too, so that the checks refuse them."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, (LoraLinear, LoraParam))]


def _base_path(path: str) -> str:
    """A layer's path inside the base model, as rank_pattern / alpha_pattern are matched against it."""
    return path[len(PREFIX):] if path.startswith(PREFIX) else path


# --- prepare ---------------------------------------------------------------------------------------------------
def _check_layers(layers) -> None:
    """Refuse, before anything changes, layers whose adapters cannot be swapped in place."""
    refused = [f"{path} ({why})" for path, m in layers if (why := m.hotswap_refusal()) is not None]
    if refused:
        raise ValueError(f"Hot swapping is not supported for LoRA layers {', '.join(refused)} (nothing was changed); "
                         "load the adapter with load_adapter and switch with set_adapter instead.")


def _set_rank(module: nn.Module, rank: int, is_a: bool) -> None:
    """The rank attribute of an A (its output size) or B (its input size): Linear's features, a conv's channels."""
    if hasattr(module, "in_features"):
        setattr(module, "out_features" if is_a else "in_features", rank)
    else:
        setattr(module, "out_channels" if is_a else "in_channels", rank)


def _pad(linear: nn.Module, target_rank: int, is_a: bool) -> None:
    """Zero rows of A / zero columns of B up to ``target_rank`` (dim 0 / dim 1, Linear or convolution weights): the
    layer's output is unchanged."""
    weight = linear.weight
    rank = weight.shape[0] if is_a else weight.shape[1]
    if rank == target_rank:
        return
    shape = list(weight.shape)
    shape[0 if is_a else 1] = target_rank
    padded = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        (padded[:rank] if is_a else padded[:, :rank]).copy_(weight)
    linear.weight = nn.Parameter(padded, requires_grad=weight.requires_grad)
    _set_rank(linear, target_rank, is_a)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[Union[LoraConfig, dict[str, LoraConfig]]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with its first adapter loaded for hot-swapping after ``torch.compile``.

    Call it after loading the first adapter and before compiling. ``target_rank`` should be the largest rank of
    all adapters to be swapped in; every LoRA layer is zero-padded to it (outputs unchanged). Scalings become 0-d
    float32 tensors, so adapters with other alphas or ranks swap in without recompiling. With ``config`` (a
    LoraConfig or a dict of them, e.g. ``model.peft_config``) and ``target_rank``, the configs' ``r`` and
    ``rank_pattern`` values are set to ``target_rank``, as PEFT does. Modifies ``model`` in place.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' "
                         "instead.")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. "
                          "This will likely result in re-compilation, hurting performance. Call the function "
                          "before compiling the model.")
    layers = _lora_layers(_unwrap(model))
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    _check_layers(layers)
    if target_rank is not None:  # checks first: a refused call changes nothing
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank <= 0:
            raise ValueError(f"target_rank must be a positive integer, got {target_rank!r}.")
        for path, m in layers:
            for name, a in m.lora_A.items():
                if a.weight.shape[0] > target_rank:
                    raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but the original "
                                     f"rank is larger ({a.weight.shape[0]}, adapter '{name}' of {path}). This is "
                                     "not possible.")
    for _, m in layers:
        for name in list(m.lora_A.keys()):
            scaling = m.scaling[name]
            if not isinstance(scaling, torch.Tensor):
                m.scaling[name] = torch.tensor(float(scaling), dtype=torch.float32,
                                               device=m.lora_A[name].weight.device)
            if target_rank is not None:
                _pad(m.lora_A[name], target_rank, is_a=True)
                _pad(m.lora_B[name], target_rank, is_a=False)
                # Unlike PEFT (which leaves it stale), r follows the weights: mixed-batch stacks are sized from it.
                m.r[name] = target_rank
        m.invalidate()  # new parameters and scalings: the plans read them
    if not config or target_rank is None:
        return
    for cfg in (config.values() if isinstance(config, dict) else [config]):
        cfg.r = target_rank
        for key in cfg.rank_pattern or {}:
            cfg.rank_pattern[key] = target_rank


# --- checks ----------------------------------------------------------------------------------------------------
def check_hotswap_configs_compatible(config0, config1) -> None:
    """Raise a ValueError when two adapters' configs differ in a field that hot-swapping cannot change."""
    type0, type1 = (str(getattr(getattr(c, "peft_type", "LORA"), "value", getattr(c, "peft_type", "LORA")))
                    for c in (config0, config1))
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0} and {type1}")
    if type0 != "LORA":
        raise ValueError(f"Hotswapping only supports LORA but {type0} was passed.")
    dict0, dict1 = config0.to_dict(), config1.to_dict()
    sentinel = object()
    for key in CONFIG_KEYS_TO_CHECK:
        val0, val1 = dict0.get(key, sentinel), dict1.get(key, sentinel)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")


@dataclass
class _LayerSwap:
    layer: LoraLinear
    new: dict  # (part, attr) -> tensor from the state dict
    scaling: float


def _param_index(layers: list[tuple[str, LoraLinear]], adapter_name: str) -> dict[str, tuple[str, tuple]]:
    """Model key of every parameter of ``adapter_name`` -> (layer path, (part, attr))."""
    index = {}
    for path, m in layers:
        for part, attr in _PARTS:
            if getattr(getattr(m, part)[adapter_name], attr) is not None:
                index[f"{path}.{part}.{adapter_name}.{attr}"] = (path, (part, attr))
    return index


def _model_key(key: str, adapter_name: str, index: dict) -> Optional[str]:
    """PEFT's keys (adapter name inserted, as in ``model.state_dict()``) or file keys (adapter name dropped)."""
    while key.startswith("_orig_mod."):
        key = key[len("_orig_mod."):]
    if key in index:
        return key
    for part in ("lora_A", "lora_B"):
        path, sep, rest = key.rpartition(f".{part}.")
        if sep and f"{path}.{part}.{adapter_name}.{rest}" in index:
            return f"{path}.{part}.{adapter_name}.{rest}"
    return None


def _plan_swap(layers, state_dict: dict, adapter_name: str, config: LoraConfig) -> tuple[list[_LayerSwap], list]:
    """Validate the new adapter against the loaded one; return what to copy and which tensors to zero."""
    if not variant_for(config).hotswappable or any(not m.lora_variant[adapter_name].hotswappable for _, m in layers):
        raise ValueError("Hot swapping DoRA adapters (use_dora=True) is not supported (nothing was changed); load the "
                         "adapter with load_adapter and switch with set_adapter instead.")
    index = _param_index(layers, adapter_name)
    by_path = dict(layers)
    new: dict[str, dict] = {}
    unexpected = []
    for key, value in state_dict.items():
        model_key = _model_key(key, adapter_name, index)
        if model_key is None:
            unexpected.append(key)
            continue
        path, part = index[model_key]
        new.setdefault(path, {})[part] = value
    if unexpected:
        raise RuntimeError("Hot swapping the adapter did not succeed, unexpected keys found: "
                           f"{', '.join(unexpected)}. The new adapter may only target layers (and LoRA weights) that "
                           f"the loaded adapter '{adapter_name}' has; modules_to_save and base biases cannot be "
                           "hot-swapped.")
    swaps, problems = [], []
    for path, tensors in new.items():
        m = by_path[path]
        if ("lora_A", "weight") not in tensors or ("lora_B", "weight") not in tensors:
            problems.append(f"{path}: the new adapter must provide both lora_A and lora_B weights")
            continue
        base_path = _base_path(path)
        rank = pattern_value(config.rank_pattern, base_path, config.r)
        alpha = pattern_value(config.alpha_pattern, base_path, config.lora_alpha)
        want = m.factor_shapes(rank)
        bad = [f"{part}.{attr} has shape {tuple(t.shape)}, expected {want[(part, attr)]}"
               for (part, attr), t in tensors.items() if tuple(t.shape) != want[(part, attr)]]
        if bad:
            problems.append(f"{path}: " + ", ".join(bad) + f" (rank {rank} from the new config)")
            continue
        loaded_rank = m.lora_A[adapter_name].weight.shape[0]
        if rank > loaded_rank and isinstance(m.scaling[adapter_name], torch.Tensor):
            problems.append(f"{path}: the new adapter has rank {rank}, larger than the rank {loaded_rank} this model "
                            "was prepared for; call prepare_model_for_compiled_hotswap with a target_rank of at "
                            "least the largest rank of all adapters to be swapped in")
            continue
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        swaps.append(_LayerSwap(m, tensors, scaling))
    if problems:
        raise ValueError("Hot swapping the adapter did not succeed (nothing was changed): " + "; ".join(problems))
    # Parameters the new adapter does not provide are zeroed: their layers then add nothing, as in PEFT.
    zeros = [(by_path[path], part) for path, part in index.values() if part not in new.get(path, {})]
    return swaps, zeros


def _copy(linear: nn.Module, attr: str, value: torch.Tensor, rank_dim: Optional[int]) -> None:
    """Copy ``value`` into the parameter in place, zero-padding a smaller rank (``rank_dim``) into it."""
    param = getattr(linear, attr)
    value = value.to(dtype=param.dtype, device=param.device)
    if rank_dim is not None and value.shape[rank_dim] > param.shape[rank_dim]:
        param.data = value.clone()  # a larger rank in an unprepared model: the shape changes, as in PEFT
        _set_rank(linear, value.shape[rank_dim], rank_dim == 0)
        return
    if value.shape == param.shape:
        param.copy_(value)
        return
    param.zero_()
    (param[: value.shape[0]] if rank_dim == 0 else param[:, : value.shape[1]]).copy_(value)


# --- swapping --------------------------------------------------------------------------------------------------
@changes_adapters
def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Replace the weights and scalings of the loaded adapter ``adapter_name`` with those in ``state_dict``.

    Keys are PEFT's: as in ``model.state_dict()`` (adapter name inserted) or as in the adapter file. The new
    adapter may target a subset of the loaded one's layers (the others get zeros) with ranks up to the prepared
    rank; ``config`` gives its ranks and alphas. Raises, leaving the model unchanged, if it targets other layers,
    has a larger rank than the model was prepared for, or its shapes disagree with ``config``.
    """
    if parameter_prefix != "lora_":
        raise ValueError(f"Only LoRA (parameter_prefix='lora_') can be hot-swapped, got {parameter_prefix!r}.")
    config = as_config(config)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"Hotswapping only supports LORA but {config.peft_type} was passed.")
    inner = _unwrap(model)
    loaded = getattr(inner, "peft_config", None)
    if isinstance(loaded, dict) and adapter_name in loaded:
        check_hotswap_configs_compatible(loaded[adapter_name], config)
    _check_layers([(k, m) for k, m in _lora_layers(inner) if m.has_adapter(adapter_name)])
    layers = [(k, m) for k, m in _lora_layers(inner) if adapter_name in m.lora_A]
    if not layers:
        raise RuntimeError(f"Hot swapping the adapter did not succeed: the model has no LoRA layer with an adapter "
                           f"named '{adapter_name}'.")
    if any(adapter_name in m.merged_adapters for _, m in layers):
        raise ValueError(f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base "
                         "weights. Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`; "
                         "unmerging after a swap of merged weights would otherwise corrupt them.")
    swaps, zeros = _plan_swap(layers, state_dict, adapter_name, config)
    with torch.no_grad():  # everything is checked: from here on nothing raises
        for m, (part, attr) in zeros:
            getattr(getattr(m, part)[adapter_name], attr).zero_()
        for s in swaps:
            m = s.layer
            for (part, attr), value in s.new.items():
                rank_dim = None if attr == "bias" else (0 if part == "lora_A" else 1)
                _copy(getattr(m, part)[adapter_name], attr, value, rank_dim)
            m.r[adapter_name] = m.lora_A[adapter_name].weight.shape[0]
            if isinstance(m.scaling[adapter_name], torch.Tensor):
                m.scaling[adapter_name].fill_(s.scaling)
            else:
                m.scaling[adapter_name] = s.scaling
        for _, m in layers:
            m.invalidate()


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str = "default",
    torch_device: Optional[str] = None,
    **kwargs,
) -> None:
    """Swap the saved adapter at ``model_name_or_path`` (a folder or Hub id) into the loaded adapter
    ``adapter_name`` of ``model`` (a PeftModel, compiled or not), keeping its name. See
    ``hotswap_adapter_from_state_dict`` for what may differ; the configs must also agree on
    ``CONFIG_KEYS_TO_CHECK``. ``kwargs``: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``.
    """
    inner = _unwrap(model)
    loaded = getattr(inner, "peft_config", None)
    if not isinstance(loaded, dict) or adapter_name not in loaded:
        raise RuntimeError(f"Hot swapping the adapter did not succeed: the model has no adapter named "
                           f"'{adapter_name}' (loaded: {sorted(loaded) if isinstance(loaded, dict) else 'none'}).")
    config, tensors, _ = read_adapter(model_name_or_path, None, False, kwargs)
    check_hotswap_configs_compatible(loaded[adapter_name], config)
    if torch_device is not None:
        tensors = {k: v.to(torch_device) for k, v in tensors.items()}
    hotswap_adapter_from_state_dict(inner, tensors, adapter_name, config)

"""4-bit checkpoints of `peft_fast.quantize`d models in transformers' format, and loading them back without
bitsandbytes (`peft_fast.load_quantized`).

What `save_quantized` writes is a transformers 4-bit checkpoint: NF4Linear's state dict already uses transformers'
4-bit keys (`weight.absmax`, `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`), and
config.json gets the bitsandbytes `quantization_config` naming the layers left dense, so transformers +
bitsandbytes loads it as it loads its own. The file is written with safetensors directly, not with
`save_pretrained`, which refuses the double-quantization codebook the layers share (aliased tensors are stored
as copies).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import torch
import torch.nn as nn

from .. import files
from .experts import is_experts_module
from .nf4_experts import NF4Experts
from .nf4_linear import NF4Linear, _dtype_name, storage_dtype
from .quantize import quantize_except

QUANTIZE_KEY = "peft_fast_quantize"  # safetensors metadata: the settings `quantize` used (compute dtype included)
MODEL_WEIGHTS = "model.safetensors"


def _dtype(name: Optional[str]) -> Any:
    return name if name in (None, "auto") else getattr(torch, name)


def _dense_linears(model: nn.Module) -> list[str]:
    """Layers transformers' bitsandbytes loading would quantize that stayed dense here (the output head, ...)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]


def quant_settings(model: nn.Module) -> dict:
    """The settings a checkpoint records (`quantize`'s quant type, blocksize, double quantization and compute
    dtype), read from the model's 4-bit layers and stacks. One config names one of each, so layers that differ in
    any but the blocksize (each layer's own quant state holds it) are refused."""
    layers = [m for m in model.modules() if isinstance(m, (NF4Linear, NF4Experts))]
    if not layers:
        raise ValueError(f"save_quantized: {type(model).__name__} has no 4-bit layers (peft_fast.quantize makes "
                         "them); save a 16- or 32-bit model with save_pretrained.")
    states = [(st, m.compute_dtype if isinstance(m, NF4Linear) else m.nf4_compute_dtype) for m in layers
              for st in ([m.quant_state] if isinstance(m, NF4Linear) else [m.nf4_state(n) for n in m._nf4_names])]
    seen = {"quant_type": {st.quant_type for st, _ in states}, "double_quant": {st.nested for st, _ in states},
            "compute_dtype": {None if c is None else _dtype_name(c) for _, c in states}}
    mixed = {k: sorted(map(str, v)) for k, v in seen.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"save_quantized: the 4-bit layers differ in {mixed}; a checkpoint's config names one of "
                         "each. Quantize every layer with the same settings.")
    # blocksize: informative only (loading reads each layer's own); the most common one when layers differ
    blocksizes = [st.blocksize for st, _ in states]
    return {**{k: next(iter(v)) for k, v in seen.items()}, "blocksize": max(set(blocksizes), key=blocksizes.count)}


def save_quantized(model: nn.Module, folder: str, settings: Optional[dict] = None) -> None:
    """Save a `peft_fast.quantize`d model (a merged QLoRA model, say) as a transformers 4-bit checkpoint:
    config.json (+ generation_config.json) and model.safetensors, which `load_quantized` and transformers +
    bitsandbytes load. transformers' save_pretrained cannot write it (see the module's docstring). `settings`:
    what the checkpoint records (default: read from the layers, `quant_settings`). Everything is checked before
    anything is written; each file is written atomically, the weights first."""
    if hasattr(model, "get_base_model"):  # an adapter model (merged in place by merge_and_unload): the model within
        model = model.get_base_model()
    if any(hasattr(m, "lora_A") or hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError(f"save_quantized: {type(model).__name__} has adapter layers. Save the adapter with "
                         "save_pretrained, or merge it first (merge_and_unload()) and save the merged model.")
    if not hasattr(model, "config"):
        raise ValueError(f"save_quantized: {type(model).__name__} is not a transformers model (no .config): the "
                         "checkpoint's config.json comes from it.")
    settings = quant_settings(model) if settings is None else settings
    config = model.config
    compute = settings["compute_dtype"] or str(model.dtype).removeprefix("torch.")
    storages = {_dtype_name(m.quant_storage) for m in model.modules() if isinstance(m, (NF4Linear, NF4Experts))}
    if len(storages) > 1:  # the config names one bnb_4bit_quant_storage for every layer
        raise ValueError(f"save_quantized: the 4-bit layers store their codes in several dtypes ({sorted(storages)}); "
                         "transformers' config names one. Quantize every layer with the same quant_storage.")
    architectures = getattr(config, "architectures", None)
    config.architectures = [type(model).__name__]  # as save_pretrained records it: what load_quantized builds
    config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": settings["quant_type"], "bnb_4bit_use_double_quant": settings["double_quant"],
        "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": next(iter(storages), "uint8"),
        "llm_int8_skip_modules": _dense_linears(model),
    }
    try:
        with files.folder_lock(folder):
            files.atomic_save_tensors(os.path.join(folder, MODEL_WEIGHTS), model.state_dict(),
                                      metadata={QUANTIZE_KEY: json.dumps(settings)})
            files.atomic_write_text(os.path.join(folder, "config.json"), config.to_json_string())
    finally:
        del config.quantization_config  # the model in memory is not a bitsandbytes model
        config.architectures = architectures
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def load_quantized(path: str, model_class: Any = None, device: Optional[str] = None,
                   quant_storage: Any = None) -> nn.Module:
    """Load a 4-bit checkpoint saved by `peft-fast quantize` (or by transformers + bitsandbytes, safetensors)
    as a model with peft_fast NF4Linear layers, without bitsandbytes: the model is built from its config, its
    linear layers are made NF4Linear with the saved settings (and its expert stacks 4-bit, when the checkpoint holds
    them so), and the checkpoint is loaded into them.
    `model_class`: a transformers class (default: config.architectures[0]); `device`: where to put the model;
    `quant_storage`: the dtype the layers keep their codes in (default: the checkpoint's bnb_4bit_quant_storage;
    a float type for FSDP2 on torch 2.11, see peft_fast.quantize)."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(qc, dict) or not qc.get("load_in_4bit"):
        raise ValueError(f"{path} is not a 4-bit checkpoint (config.json has no 4-bit quantization_config)")
    storage = storage_dtype(quant_storage or qc.get("bnb_4bit_quant_storage") or "uint8")
    del config.quantization_config  # build the dense model; the 4-bit layers are peft_fast's
    shards = _shards(path)
    with safe_open(shards[0], framework="pt") as fh:
        saved = json.loads((fh.metadata() or {}).get(QUANTIZE_KEY, "null")) or {}
    keys = []
    for shard in shards:
        with safe_open(shard, framework="pt") as fh:
            keys += list(fh.keys())
    # 4-bit expert stacks (peft_fast.quantize's, not bitsandbytes'): a stack's quant state sits right under its name
    stacks = any(re.search(r"\.(gate_up_proj|up_proj|down_proj)\.quant_state\.bitsandbytes__", k) for k in keys)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, str(arch), None) or transformers.AutoModelForCausalLM
    model = _empty_model(model_class, config)
    for m in model.modules():  # garbage from the uninitialised allocation could be NaN, which quantize refuses
        if type(m) is nn.Linear:
            nn.init.zeros_(m.weight)
        elif is_experts_module(m):
            for p in m._parameters.values():
                if p is not None and p.dim() == 3:
                    nn.init.zeros_(p)
    # The blocksize and quant type of each layer come from its own saved quant state; the compute dtype does not.
    compute = saved.get("compute_dtype", qc.get("bnb_4bit_compute_dtype"))
    # Which linear layers are 4-bit is the checkpoint's own choice (its quant-state keys), whatever the defaults
    four_bit = {k.split(".weight.quant_state.")[0] for k in keys if ".weight.quant_state.bitsandbytes__" in k}
    dense = {n for n, m in model.named_modules() if n and type(m) is nn.Linear and n not in four_bit}
    quantize_except(model, dense | set(qc.get("llm_int8_skip_modules") or ()),
                    quant_type=qc.get("bnb_4bit_quant_type", "nf4"), blocksize=64,
                    double_quant=bool(qc.get("bnb_4bit_use_double_quant")), compute_dtype=_dtype(compute),
                    experts=stacks, progressbar=False, quant_storage=storage)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(files.load_tensors(shard))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:  # tied weights (lm_head = embed_tokens) are saved once by transformers
        model.tie_weights()
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k not in result.missing_keys}
    untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {untied[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval() if device else model.eval()


def _shards(path: str) -> list[str]:
    index = os.path.join(path, MODEL_WEIGHTS + ".index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            return sorted({os.path.join(path, f) for f in json.load(fh)["weight_map"].values()})
    if not os.path.isfile(os.path.join(path, MODEL_WEIGHTS)):
        raise files.AdapterFileNotFoundError(f"{path} has no {MODEL_WEIGHTS} (safetensors checkpoints only)")
    return [os.path.join(path, MODEL_WEIGHTS)]


def _empty_model(model_class: Any, config: Any) -> nn.Module:
    """The model without its random init (every weight is loaded afterwards; a 7B init takes minutes)."""
    from transformers.initialization import no_init_weights

    dtype = getattr(config, "dtype", None) or torch.float32
    with no_init_weights():
        if hasattr(model_class, "from_config"):
            return model_class.from_config(config, dtype=_dtype(dtype) if isinstance(dtype, str) else dtype)
        return model_class._from_config(config, dtype=_dtype(dtype) if isinstance(dtype, str) else dtype)

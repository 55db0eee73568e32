"""Reading a saved adapter (a local folder or a Hub repo): its config, by its peft_type, and its tensors."""
from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Optional

import torch

from . import files
from .config import CONFIG_NAME, PeftConfig, as_config
from .tuners import injection
from .tuners.file_keys import PREFIX, check_file_tensors


def read_adapter(model_id: str, config: Optional[Any], is_trainable: bool, kwargs: dict):
    """(config, tensors, path of the weights file); `config` overrides the saved one. Nothing is touched. A saved
    config that disagrees with the one saved inside the weights (an interrupted save) is refused; a caller who
    brings the config takes responsibility for it."""
    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "subfolder", "local_files_only") if k in kwargs}
    subfolder = hub.pop("subfolder", None)
    if config is None:
        config_path = files.resolve_file(model_id, CONFIG_NAME, subfolder=subfolder, **hub)
        config = PeftConfig.from_json_file(config_path)
        path = files.find_weights(model_id, subfolder=subfolder, **hub)
        files.check_pair(config_path, path)
    else:
        config = copy.deepcopy(as_config(config))
        path = files.find_weights(model_id, subfolder=subfolder, **hub)
    config.inference_mode = not is_trainable
    tensors = files.load_tensors(path)
    return config, remap_keys(tensors, kwargs.get("key_mapping"), path), path


def remap_keys(tensors: dict[str, torch.Tensor], key_mapping: Optional[dict[str, str]],
               source: str) -> dict[str, torch.Tensor]:
    """PEFT's `key_mapping`: regex -> replacement, applied to each file key without its `base_model.model.` (or
    `base_model.`) prefix; the first pattern that matches wins."""
    if not key_mapping:
        return tensors
    out = {}
    for key, value in tensors.items():
        prefix = PREFIX if key.startswith(PREFIX) else "base_model." if key.startswith("base_model.") else None
        if prefix is None:
            raise ValueError(f"key_mapping needs PEFT file keys (base_model.model.<module>...), got {key!r} in "
                             f"{source}.")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new, n = re.subn(pattern, replacement, rest)
            if n:
                rest = new
                break
        if prefix + rest in out:
            raise ValueError(f"key_mapping maps two keys of {source} to {prefix + rest!r}; nothing was loaded.")
        out[prefix + rest] = value
    return out


def convert_v4_layout(model, config, tensors: dict[str, torch.Tensor], adapter_name: str):
    """(config, tensors) of an adapter trained on transformers v4 for a model whose layout v5 changed (Mixtral's
    and other mixture-of-experts layers: one 3-D parameter per projection, the experts' w1/w3 fused; vision-language
    models: modules moved, keys renamed), rewritten for the v5 model as PEFT rewrites them; anything else is
    returned as it is. The conversion follows transformers' own weight-conversion mapping, which PEFT's converter
    tracks, so it runs through PEFT when PEFT is installed; without it such an adapter is refused when loading
    (its modules no longer exist)."""
    # The conversion rewrites targets into target_parameters: only a config with that field can take it (PEFT
    # converts LoRA adapters only, the one type that has it).
    if not hasattr(config, "target_parameters") or not hasattr(getattr(model, "config", None), "model_type"):
        return config, tensors
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: nothing changed
        return config, tensors
    if get_checkpoint_conversion_mapping(model.config.model_type) is None:
        return config, tensors
    try:
        from peft.utils import transformers_weight_conversion as convert
    except ImportError:
        _warn_unconverted(model, tensors)
        return config, tensors
    peft_config = config.to_peft()
    convert.convert_peft_config_for_transformers(peft_config, model=model,
                                                 conversions=convert.get_model_conversion_mapping(model))
    tensors = convert.convert_peft_adapter_state_dict_for_transformers(  # renamed keys even where the config stays
        model=model, peft_config=peft_config, adapter_state_dict=tensors, adapter_name=adapter_name)
    fields = ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern")
    if all(_same(getattr(peft_config, f), getattr(config, f)) for f in fields):
        return config, tensors
    config = copy.deepcopy(config)
    for f in fields:
        value = getattr(peft_config, f)
        setattr(config, f, set(value) if isinstance(value, (set, list)) and f == "target_modules" else
                sorted(value) if isinstance(value, set) else value)
    return config, tensors


def _same(a, b) -> bool:
    norm = lambda v: sorted(v) if isinstance(v, (set, list, tuple)) else ({} if v is None else v)  # noqa: E731
    return norm(a) == norm(b)


def _warn_unconverted(model, tensors: dict[str, torch.Tensor]) -> None:
    """Without PEFT, an adapter naming modules this model (whose layout transformers 5 changed) lacks is likely a
    transformers-4 one: say so before loading refuses it, since the refusal cannot tell the cause."""
    modules = {k for k, _ in model.named_modules()}
    stale = [k for k in tensors if ".lora_" in k and k.removeprefix(PREFIX).split(".lora_")[0] not in modules]
    if stale:
        warnings.warn(f"This adapter names modules the {model.config.model_type} model lacks (e.g. {stale[0]}): it "
                      "was probably trained on transformers 4, whose layout of this model transformers 5 changed. "
                      "Converting it needs Hugging Face PEFT (pip install peft, or peft-fast[trainer]).",
                      stacklevel=3)


def plan_file(model, config: Any, tuner_cls, tensors: dict, source: str) -> tuple[dict, Any]:
    """(tensors, plan): a file's adapter planned on `model` (already prepared: tuner_cls.preparing) and checked
    against it, so that nothing loads from a file that does not fit. The tensors are what loads: the keys a
    prepared model does not have, as PEFT drops them, dropped (tuner_cls.file_tensors)."""
    tensors = tuner_cls.file_tensors(model, config, tensors)
    plan = injection.plan_adapter(model, config, tuner_cls, {k.removeprefix(PREFIX) for k in tensors})
    check_file_tensors(tensors, model, plan, tuner_cls, source)
    return tensors, plan


def init_when_loading(tuner_cls, config) -> Optional[bool]:
    """False (the weights come from the file), except for PiSSA/OLoRA: their initialisation also makes the base
    the residual the saved factors were trained on, so it runs, as in PEFT, before the file's factors replace its."""
    return None if tuner_cls.rewrites_base(config) else False

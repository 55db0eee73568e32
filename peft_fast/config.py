"""LoraConfig: PEFT's LoRA configuration, its defaults, its checks and its adapter_config.json."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
SUPPORTED_INITS = (True, False, "gaussian", "pissa", "pissa_niter_[n]", "olora")
PEFT_ONLY_INITS = ("loftq", "eva", "corda", "orthogonal", "lora_ga", "mica")

# Keys that Hugging Face PEFT writes into adapter_config.json for LoRA, with the value meaning "feature unused".
# peft_fast reads such files silently when these keys hold their neutral value, and warns when a file asks for a
# PEFT feature that peft_fast does not implement (the key is then ignored, never a crash).
PEFT_ONLY_KEYS: dict[str, Any] = {
    "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {}, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
    "runtime_config": {"ephemeral_gpu_offload": False}, "target_parameters": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False, "trainable_token_indices": None,
    "auto_mapping": None, "revision": None,
}

INERT_KEYS = ("auto_mapping", "revision", "runtime_config", "qalora_group_size", "megatron_core")
OUTPUT_CHANGING_KEYS = (
    "megatron_config", "layer_replication", "use_qalora", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config",
)


@dataclass
class LoraConfig:
    """PEFT's ``LoraConfig``: same field names, same defaults, same validation.

    ``target_modules`` is a list of module-name suffixes, a regex matched against the full module name, or
    ``"all-linear"`` (every linear layer except the output head).
    """

    r: int = 8
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if self.peft_type != "LORA":
            raise ValueError(f"peft_fast only implements LoRA, but this config has peft_type={self.peft_type!r}.")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"Invalid task type: {self.task_type!r}. Must be one of: {', '.join(TASK_TYPES)}.")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise NotImplementedError(f"Requested bias: {self.bias}, is not implemented; use 'none', 'all' or 'lora_only'.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}.")
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else self.target_modules
        self.exclude_modules = set(self.exclude_modules) if isinstance(self.exclude_modules, (list, tuple)) else self.exclude_modules
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora") or _is_pissa_niter(init)):
            known = isinstance(init, str) and init.split("_niter_")[0] in PEFT_ONLY_INITS
            raise (NotImplementedError if known else ValueError)(
                f"Unknown initialization init_lora_weights={init!r}" if not known else
                f"init_lora_weights={init!r} is a PEFT initialisation peft_fast does not implement yet"
                f"; use one of {SUPPORTED_INITS}."
            )
        if self.lora_bias:
            if not isinstance(init, bool):
                raise ValueError(
                    "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={init} instead."
                )
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # --- conversions -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the config") -> "LoraConfig":
        data = dict(data)
        data.pop("peft_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in sorted(set(data) - known):
            value = data[key]
            if key not in PEFT_ONLY_KEYS:
                warnings.warn(f"{source}: unknown key {key!r} is ignored (written by a newer PEFT or another tool?).")
            elif value == PEFT_ONLY_KEYS[key] or value in (None, {}, [], False) or key in INERT_KEYS:
                continue
            elif key in OUTPUT_CHANGING_KEYS:
                # Ignoring these would silently give outputs different from PEFT's: refuse instead.
                raise NotImplementedError(f"{source}: {key}={value!r} is a PEFT feature that changes the model's "
                                          "outputs and peft_fast does not implement it yet; use Hugging Face PEFT "
                                          "for this adapter.")
            else:
                warnings.warn(f"{source}: {key}={value!r} (a PEFT initialisation or training option) is ignored.")
        return cls(**kwargs)

    @classmethod
    def from_peft(cls, config: Any) -> "LoraConfig":
        """Build from a ``peft.LoraConfig`` (or any object with ``to_dict``)."""
        peft_type = getattr(config, "peft_type", "LORA")
        peft_type = getattr(peft_type, "value", peft_type)
        if str(peft_type) != "LORA":
            raise ValueError(f"peft_fast only implements LoRA; got a {type(config).__name__} with peft_type={peft_type}.")
        data = config.to_dict()
        for key in ("task_type", "peft_type"):
            data[key] = getattr(data.get(key), "value", data.get(key))
        return cls.from_dict(data, source=f"peft.{type(config).__name__}")

    # --- files -------------------------------------------------------------------------------------------------
    def to_json_string(self, auto_mapping: Optional[dict] = None) -> str:
        """PEFT's adapter_config.json: every key PEFT writes (its features we lack at their neutral values)."""
        from . import __version__

        written = {k: v for k, v in PEFT_ONLY_KEYS.items() if k != "runtime_config"}  # PEFT never writes it
        data = {**copy.deepcopy(written), **self.to_dict(), "auto_mapping": auto_mapping}
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
        data["peft_version"] = f"peft_fast-{__version__}"
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str, auto_mapping: Optional[dict] = None) -> None:
        from .files import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string(auto_mapping))

    @classmethod
    def from_json_file(cls, path: str) -> "LoraConfig":
        if not os.path.isfile(path):
            from .files import AdapterFileNotFoundError

            raise AdapterFileNotFoundError(f"Can't find {CONFIG_NAME} at {path!r}: is this a folder written by "
                                           "save_pretrained?")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); the adapter config is corrupt, save it again.") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
        return cls.from_dict(data, source=path)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None, **hub_kwargs: Any) -> "LoraConfig":
        from .files import resolve_file

        return cls.from_json_file(resolve_file(path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs))

    @property
    def is_prompt_learning(self) -> bool:
        return False


PeftConfig = LoraConfig


def _is_pissa_niter(init: Any) -> bool:
    return isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init) is not None


def as_lora_config(config: Any) -> LoraConfig:
    """Accept a peft_fast LoraConfig, a peft.LoraConfig, or a dict."""
    if isinstance(config, LoraConfig):
        return config
    if isinstance(config, dict):
        return LoraConfig.from_dict(config)
    if hasattr(config, "to_dict") and hasattr(config, "peft_type"):
        return LoraConfig.from_peft(config)
    raise TypeError(f"Expected a LoraConfig (peft_fast or peft), got {type(config).__name__}.")

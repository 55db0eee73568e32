"""LoraConfig: PEFT's LoRA configuration, its defaults, its checks and its adapter_config.json keys."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ...config import ConfigError, PeftConfig

SUPPORTED_INITS = (True, False, "gaussian", "pissa", "pissa_niter_[n]", "olora", "orthogonal")
PEFT_ONLY_INITS = ("loftq", "eva", "corda", "lora_ga", "mica")

# PEFT's defaults for target_modules=None, by transformers model_type (its LoRA table; LoHa's and LoKr's too).
GEMMA4_TARGETS = r".*language_model\..*\.(q_proj|v_proj)"  # PEFT's default for gemma4: a regex (its text part)
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": GEMMA4_TARGETS, "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def lora_targets_copy(**changes: list[str]) -> dict[str, list[str] | str]:
    """A copy of LoRA's default table with some model types changed: PEFT's tables for LoHa, LoKr and OFT are copies
    of LoRA's, and VeRA's differs only for phi."""
    table = {k: v if isinstance(v, str) else list(v) for k, v in DEFAULT_TARGETS.items()}
    table.update(changes)
    return table


@dataclass
class LoraRuntimeConfig:
    """PEFT's runtime options for LoRA. `ephemeral_gpu_offload` speeds up PEFT's DoRA initialisation of weights kept
    on the CPU; it changes no value, and peft_fast's initialisation runs where the weights are."""

    ephemeral_gpu_offload: bool = False


@dataclass(kw_only=True)  # keyword arguments only, as PEFT's configs are used
class LoraConfig(PeftConfig):
    """PEFT's ``LoraConfig``: same field names, same defaults, same validation.

    ``target_modules`` is a list of module-name suffixes, a regex matched against the full module name, or
    ``"all-linear"`` (every linear layer except the output head).
    """

    PEFT_TYPE = "LORA"
    # Keys PEFT writes into adapter_config.json for LoRA, with the value meaning "feature unused": read silently
    # at that value; otherwise ignored with a warning, or refused where ignoring them would change the outputs.
    PEFT_ONLY_KEYS = {
        "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {}, "eva_config": None,
        "corda_config": None, "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None,
        "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None,
        "runtime_config": {"ephemeral_gpu_offload": False}, "use_bdlora": None,
        "arrow_config": None, "kasa_config": None, "auto_mapping": None, "revision": None,
    }
    # (PEFT applies QA-LoRA to GPTQ layers only, which peft_fast does not adapt: on every base it adapts,
    # use_qalora changes nothing in PEFT either)
    INERT_KEYS = ("auto_mapping", "revision", "runtime_config", "qalora_group_size", "megatron_core", "use_qalora")
    OUTPUT_CHANGING_KEYS = (
        "megatron_config", "alora_invocation_tokens", "use_bdlora",
        "arrow_config", "kasa_config", "velora_config", "monteclora_config",
    )

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # Parameters to adapt rather than modules (3-D expert stacks of mixture-of-experts layers): names matched against
    # a parameter's full name, or its end after a dot ("experts.gate_up_proj"); see tuners/lora/experts.py.
    target_parameters: Optional[list[str]] = None
    # Rows of the input embedding (a list of token ids) or of named layers ({"embed_tokens": [...]}) trained beside
    # the adapter; see tuners/trainable_tokens.py.
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    # On a model whose output layer shares the input embedding's weight, keep the adapters of the two tied (a
    # modules_to_save copy shared, LoRA factors shared); see tuners/tied.py.
    ensure_weight_tying: bool = False
    # Ranges of decoder layers to stack, each copy sharing the original's weights with adapters of its own
    # ([[0, 4], [2, 5]]: layers 0 1 2 3 2 3 4); see tuners/replication.py.
    layer_replication: Optional[list[list[int]]] = None
    # PEFT's LoraRuntimeConfig (how, not what, is computed): accepted, never saved, as in PEFT.
    runtime_config: Any = field(default_factory=lambda: LoraRuntimeConfig())

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("runtime_config", None)  # PEFT never saves it
        return data

    def _register_custom_module(self, mapping: dict) -> None:
        raise NotImplementedError("LoraConfig._register_custom_module: peft_fast's LoRA adapts the layer types it has "
                                  "views for (README, 'Supported / not yet'); custom layer classes need PEFT.")

    def __post_init__(self) -> None:
        if isinstance(self.runtime_config, dict):  # as read from an older PEFT's file
            self.runtime_config = LoraRuntimeConfig(**{k: v for k, v in self.runtime_config.items()
                                                       if k == "ephemeral_gpu_offload"})
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        super().__post_init__()  # the type of every field
        bad_rank = {k: v for k, v in self.rank_pattern.items() if v <= 0}
        if bad_rank:
            raise ConfigError(f"LoraConfig.rank_pattern must map to positive ranks, got {bad_rank}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise NotImplementedError(f"Requested bias: {self.bias}, is not implemented; use 'none', 'all' or 'lora_only'.")
        if not 0.0 <= float(self.lora_dropout) <= 1.0:  # (1: the adapter adds nothing in training, as in PEFT)
            raise ValueError(f"`lora_dropout` must be in [0, 1], got {self.lora_dropout}.")
        init = self.init_lora_weights
        # A PEFT-only initialisation is a valid config (its adapters load: the weights come from the file);
        # creating an adapter with it is refused (LoraModel.check_init).
        if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() in ("gaussian", "olora"))
                or init in ("pissa", "orthogonal") or _is_pissa_niter(init) or peft_only_init(init)):
            raise ValueError(f"Unknown initialization init_lora_weights={init!r}; use one of {SUPPORTED_INITS}.")
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if self.trainable_token_indices is not None:
            self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        if self.lora_bias:
            if not isinstance(init, bool):
                raise ValueError(
                    "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={init} instead."
                )
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")


def _token_indices(value: Any) -> Any:
    """Lists of distinct non-negative token ids (a delta row each: a repeated id would leave one row unused and its
    result undefined in PEFT's index_copy); dict keys are layer names."""
    layers = value if isinstance(value, dict) else {None: value}
    out = {}
    for name, ids in layers.items():
        where = "trainable_token_indices" + (f"[{name!r}]" if name is not None else "")
        if name is not None and not name.strip():
            raise ConfigError(f"trainable_token_indices maps layer names to token ids; got the empty name {name!r}.")
        if isinstance(ids, set):
            raise ConfigError(f"{where} must be a list (its order is the order of the trainable rows), got a set.")
        ids = list(ids)
        bad = [i for i in ids if i < 0]
        if bad:
            raise ConfigError(f"{where} holds negative token ids {bad}; token ids start at 0.")
        seen: set = set()
        repeated = sorted({i for i in ids if i in seen or seen.add(i)})
        if repeated:
            raise ConfigError(f"{where} repeats token ids {repeated}; list each token once.")
        out[name] = ids
    return out if isinstance(value, dict) else out[None]


def peft_only_init(init: Any) -> bool:
    """An initialisation of PEFT's that peft_fast cannot run (its data-driven or quantisation-aware ones)."""
    return isinstance(init, str) and (init.lower() in PEFT_ONLY_INITS or init.startswith("corda"))


def _is_pissa_niter(init: Any) -> bool:
    return isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init) is not None


def rewrites_base(init: Any) -> bool:
    """PiSSA and OLoRA move the principal part of the base weight into the adapter (the base keeps the residual)."""
    return isinstance(init, str) and (init.startswith("pissa") or init.lower() == "olora")

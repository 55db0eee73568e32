"""VeraConfig: PEFT's VeRA configuration, its defaults, its checks and its adapter_config.json keys."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..lora.config import GEMMA4_TARGETS
from ...config import PeftConfig

# PEFT's defaults for target_modules=None, by transformers model_type.
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
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": GEMMA4_TARGETS, "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


@dataclass(kw_only=True)
class VeraConfig(PeftConfig):
    """PEFT's ``VeraConfig``: same field names, defaults and checks.

    Every targeted layer adds Λ_b·B·Λ_d·A·x, where A [r, in] and B [out, r] are random projections shared by all
    layers (drawn from ``projection_prng_key``, frozen) and only the vectors Λ_d (r) and Λ_b (out_features) train.
    """

    PEFT_TYPE = "VERA"

    exclude_modules: None = field(default=None, init=False, repr=False)  # PEFT's VeraConfig has no exclude_modules

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias not in ("none", "all", "vera_only"):
            raise NotImplementedError(f"Requested bias: {self.bias}, is not implemented; use 'none', 'all' or "
                                      "'vera_only'.")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save vera_A and vera_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations."
            )

"""AdaLoraConfig: PEFT's AdaLoRA configuration (LoRA's fields, which PEFT's class inherits, plus the rank
allocation's), its defaults, its checks and its adapter_config.json keys."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..lora.config import GEMMA4_TARGETS
from ...config import ConfigError, PeftConfig

# PEFT's defaults for target_modules=None, by transformers model_type (its AdaLoRA table).
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "gemma4": GEMMA4_TARGETS,
}


@dataclass(kw_only=True)
class AdaLoraConfig(PeftConfig):
    """PEFT's ``AdaLoraConfig``: same field names, defaults and checks.

    Each targeted layer adds B·(E ⊙ A)·x · lora_alpha / init_r, an SVD-like triplet of rank `init_r` (A: right
    singular vectors, E: singular values, B: left). During training `update_and_allocate(step)` prunes triplets
    by their importance until the average rank is `target_r`: `tinit` warm-up steps, then a cubic budget decrease
    until `total_step - tfinal` (a reallocation every `deltaT` steps), then fine-tuning with the final ranks, which
    `rank_pattern` records (saved files hold only the kept triplets). `beta1` / `beta2` smooth the importance and
    its uncertainty; `orth_reg_weight` weighs the orthogonality penalty added to the training loss.

    LoRA's `r`, `use_rslora`, `lora_bias` and `alpha_pattern` are fields (PEFT's class inherits them, and writes
    them) that AdaLoRA does not use, in PEFT as here.
    """

    PEFT_TYPE = "ADALORA"
    # Keys PEFT writes for AdaLoRA (its config inherits LoRA's), with the value meaning "feature unused".
    PEFT_ONLY_KEYS = {
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
        "ensure_weight_tying",  # ties the adapters of tied embedding and output layers: not implemented here
    )

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict[str, list[bool]]] = None

    def __post_init__(self) -> None:
        super().__post_init__()  # the type of every field
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA.")
        if self.bias not in ("none", "all", "lora_only"):
            raise NotImplementedError(f"Requested bias: {self.bias}, is not implemented; use 'none', 'all' or "
                                      "'lora_only'.")
        if not 0.0 <= float(self.lora_dropout) <= 1.0:  # (as PEFT's nn.Dropout takes it)
            raise ValueError(f"`lora_dropout` must be in [0, 1], got {self.lora_dropout}.")
        for key in ("init_r", "target_r", "tinit", "tfinal"):
            if getattr(self, key) < 0:
                raise ConfigError(f"AdaLoraConfig.{key} must be 0 or more, got {getattr(self, key)!r}.")
        if self.deltaT <= 0:
            raise ConfigError(f"AdaLoraConfig.deltaT (steps between two allocations) must be positive, got "
                              f"{self.deltaT!r}.")
        if self.r != 8:  # LoRA's default, which PEFT's AdaLoraConfig inherits
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored.If you intended to set the "
                          "initial rank, use `init_r` instead.")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                             f"{self.orth_reg_weight}")
        if self.tinit >= (self.total_step - self.tfinal):
            raise ValueError("The supplied schedule values don't allow for a budgeting phase. Decrease "
                             "`tfinal`/`tinit` or increase `total_step`.")

    def mask_for(self, module_key: str) -> Optional[list[bool]]:
        """The kept-rank mask `rank_pattern` holds for the layer at `module_key`, under either of PEFT's keys:
        `<module>.lora_E` (saved files) or `<module>.lora_E.<adapter>` (while training)."""
        pattern = self.rank_pattern or {}
        value = pattern.get(f"{module_key}.lora_E")
        if value is None:
            value = next((v for k, v in pattern.items() if k.startswith(f"{module_key}.lora_E.")), None)
        return None if value is None else self.as_mask(value)

    @staticmethod
    def as_mask(value: Any) -> list[bool]:
        """A rank_pattern entry as PEFT accepts it (a list of bools, or a tensor)."""
        return [bool(v) for v in (value.view(-1).tolist() if hasattr(value, "view") else value)]

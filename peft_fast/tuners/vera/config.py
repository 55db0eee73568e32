"""VeraConfig: PEFT's VeRA configuration, its defaults, its checks and its adapter_config.json keys."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..lora.config import lora_targets_copy
from ...config import PeftConfig

# PEFT's defaults for target_modules=None, by transformers model_type (its VeRA table: LoRA's but for phi).
DEFAULT_TARGETS: dict[str, list[str] | str] = lora_targets_copy(phi=["q_proj", "v_proj"])


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

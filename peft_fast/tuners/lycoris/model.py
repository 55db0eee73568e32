"""LycorisModel: what LoHaModel and LoKrModel share (PEFT's LycorisTuner) on the shared TunerModel."""
from __future__ import annotations

from ..base_model import TunerModel
from ..lora.config import lora_targets_copy
from ..targets import pattern_value

# PEFT's LoHa and LoKr default target_modules (by model_type) are a copy of LoRA's table.
DEFAULT_TARGETS: dict[str, list[str] | str] = lora_targets_copy()


class LycorisModel(TunerModel):
    config_cls: type = type(None)  # the tuner's config class
    default_targets = DEFAULT_TARGETS

    @classmethod
    def target_kwargs(cls, config, key: str) -> dict:
        return {"r": pattern_value(config.rank_pattern, key, config.r),
                "alpha": pattern_value(config.alpha_pattern, key, config.alpha)}

"""LycorisModel: what LoHaModel and LoKrModel share (PEFT's LycorisTuner) on the shared TunerModel."""
from __future__ import annotations

from typing import Optional

from ...config import as_config
from ...names import check_adapter_name
from ..base_model import TunerModel
from ..injection import Plan
from ..lora.config import DEFAULT_TARGETS as _LORA_DEFAULT_TARGETS
from ..targets import pattern_value
from .planning import plan_targets

# PEFT's LoHa and LoKr default target_modules (by model_type) are a copy of LoRA's table.
DEFAULT_TARGETS: dict[str, list[str]] = {k: list(v) for k, v in _LORA_DEFAULT_TARGETS.items()}


class LycorisModel(TunerModel):
    config_cls: type = type(None)  # the tuner's config class
    default_targets = DEFAULT_TARGETS

    @classmethod
    def target_kwargs(cls, config, key: str) -> dict:
        return {"r": pattern_value(config.rank_pattern, key, config.r),
                "alpha": pattern_value(config.alpha_pattern, key, config.alpha)}

    def add_adapter(self, adapter_name: str, config, autocast_adapter_dtype: bool = True, init: Optional[object] = None,
                    plan: Optional[Plan] = None, tensors: Optional[dict] = None, source: str = "the adapter") -> None:
        # Planned here, so that convolutions can be targets (the shared planner refuses them); every other check
        # and the change itself, with its undo, are TunerModel's.
        check_adapter_name(adapter_name)
        config = as_config(config)
        if plan is None and isinstance(config, self.config_cls) and adapter_name not in self.peft_config:
            plan = plan_targets(self.model, config, type(self))
        super().add_adapter(adapter_name, config, autocast_adapter_dtype, init=init, plan=plan, tensors=tensors,
                            source=source)

"""The config fields PEFT's LoHa and LoKr share (PEFT's LycorisConfig plus the fields both repeat)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ConfigError, PeftConfig


@dataclass(kw_only=True)
class LycorisConfig(PeftConfig):
    """Shared by LoHaConfig and LoKrConfig; PEFT's names and defaults."""

    r: int = 8
    alpha: float = 8  # PEFT annotates int and accepts floats; files hold either
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()  # the type of every field
        name = type(self).__name__
        # PEFT takes any value and fails later (a rank dropout above 1 drops every row, then divides by zero); the
        # rank itself PEFT checks per layer, as the layers here do (rank_pattern may override it).
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}.{key} is a probability and must be in [0, 1], got {value!r}.")

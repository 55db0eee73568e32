"""LoKrConfig: PEFT's LoKr configuration (Low-Rank Kronecker product), its defaults and adapter_config.json keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ...config import ConfigError
from ..lycoris.config import LycorisConfig


@dataclass(kw_only=True)
class LoKrConfig(LycorisConfig):
    """PEFT's ``LoKrConfig``: ΔW = w1 ⊗ w2 · alpha / r on Linear, Conv1d and Conv2d layers.

    The output and input sizes are each factored in two (`decompose_factor`, -1: near the square root), w1 takes
    the first factors and w2 the second. w2 (and with `decompose_both` w1) is itself low-rank (w_a·w_b) when r is
    under half its larger side. `rank_dropout_scale` rescales the rows kept by rank dropout; `init_weights`: True
    (w1 starts at zero), False (all random) or "lycoris" (w2 starts at zero, as the LyCORIS repository does).
    """

    PEFT_TYPE = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: Union[bool, str] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.init_weights, str) and self.init_weights != "lycoris":
            # PEFT types this field Literal["lycoris"] but takes any string as True; refuse instead of guessing.
            raise ConfigError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}.")

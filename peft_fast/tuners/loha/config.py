"""LoHaConfig: PEFT's LoHa configuration (Low-Rank Hadamard product), its defaults and adapter_config.json keys."""
from __future__ import annotations

from dataclasses import dataclass

from ..lycoris.config import LycorisConfig


@dataclass(kw_only=True)
class LoHaConfig(LycorisConfig):
    """PEFT's ``LoHaConfig``: ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / r on Linear, Conv1d and Conv2d layers.

    Fields: r, alpha, rank_dropout, module_dropout, use_effective_conv2d (CP-decomposed kernels for convolutions
    with kernels larger than 1), init_weights (True: w2_b starts at zero, so the adapter starts as a no-op; False:
    every factor random), rank_pattern / alpha_pattern, and the targeting fields every config has.
    """

    PEFT_TYPE = "LOHA"

    init_weights: bool = True

"""OFTConfig: PEFT's OFT configuration (orthogonal finetuning), its defaults, its checks and its adapter_config.json
keys."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from ..lora.config import lora_targets_copy
from ...config import ConfigError, PeftConfig
from ...version import __version__

# PEFT's defaults for target_modules=None, by transformers model_type (its OFT table, a copy of LoRA's).
DEFAULT_TARGETS: dict[str, list[str] | str] = lora_targets_copy()


@dataclass(kw_only=True)
class OFTConfig(PeftConfig):
    """PEFT's ``OFTConfig``: same field names, defaults and checks.

    Each targeted layer's input is rotated by a block-diagonal orthogonal matrix before the frozen layer runs:
    `r` blocks of size `oft_block_size` (give one of the two; the other follows from the layer's input size, and a
    size that does not divide it is adjusted with a warning, as in PEFT). A block is the Cayley transform of a
    skew-symmetric matrix, exact (`use_cayley_neumann=False`) or its Neumann series of `num_cayley_neumann_terms`
    terms; `block_share` uses one block for all; `coft` keeps each block within `eps` of the identity.
    `module_dropout` is accepted as PEFT accepts it and, as in PEFT 0.21.2, has no effect.
    """

    PEFT_TYPE = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError(f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and "
                             f"oft_block_size = {self.oft_block_size}.")
        if not (self.r != 0) ^ (self.oft_block_size != 0):
            raise ValueError(f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), "
                             "but not both simultaneously, because r x oft_block_size == in_features.")
        for key in ("r", "oft_block_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"OFTConfig.{key} must be 0 (derived from the other) or positive, got "
                                  f"{getattr(self, key)!r}.")
        if self.bias not in ("none", "all", "oft_only"):
            raise NotImplementedError(f"Requested bias: {self.bias}, is not implemented; use 'none', 'all' or "
                                      "'oft_only'.")
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ConfigError(f"OFTConfig.module_dropout is a probability and must be in [0, 1], got "
                              f"{self.module_dropout!r}.")
        if self.module_dropout > 0:
            warnings.warn("OFTConfig.module_dropout has no effect: PEFT 0.21.2's OFT layers create the multiplicative "
                          "dropout but never apply it, and peft_fast computes what PEFT computes.")
        if self.num_cayley_neumann_terms < 1:
            raise ConfigError(f"OFTConfig.num_cayley_neumann_terms must be at least 1, got "
                              f"{self.num_cayley_neumann_terms!r}.")

    @classmethod
    def check_file(cls, data: dict[str, Any], source: str) -> None:
        if "oft_block_size" not in data:
            raise ValueError(f"{source}: OFT has been updated since PEFT 0.14.0. Your trained adapter weights are "
                             "incompatible with the latest version of OFT. Please retrain your adapter weights with "
                             "newer PEFT versions. Alternatively, downgrade PEFT to version 0.13.0 to use the old "
                             "adapter weights.")
        if data.get("use_cayley_neumann", False) and _before_0_18(data.get("peft_version")):
            warnings.warn(f"{source}: the cayley-neumann parameterization has been slightly changed to be more "
                          "numerically stable in PEFT 0.18.0. Please retrain your adapter weights with newer PEFT "
                          "versions. Alternatively, downgrade PEFT to version 0.17.0 to use the old parameterization.")

    def to_json_string(self, auto_mapping: Optional[dict] = None) -> str:
        # PEFT's OFTConfig parses `peft_version` as a version number when it loads a Cayley-Neumann adapter (to warn
        # about files older than 0.18.0) and fails on peft_fast's usual "peft_fast-<version>". OFT files therefore
        # name the PEFT format they follow, with peft_fast's version as a local label.
        data = json.loads(super().to_json_string(auto_mapping))
        data["peft_version"] = f"0.21.2+peft_fast.{__version__}"
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _before_0_18(peft_version: Optional[str]) -> bool:
    """PEFT's test for files trained with the older Cayley-Neumann series (no peft_version: before 0.18.0, which
    added it)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version((peft_version or "0.0.0").partition("@")[0]) < Version("0.18.0")
    except InvalidVersion:  # another library's label: not PEFT's history
        return False

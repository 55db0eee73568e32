"""OFTModel: the model with OFT adapters (PEFT's ``OFTModel``), on the shared TunerModel."""
from __future__ import annotations

from ..base_model import TunerModel
from .config import DEFAULT_TARGETS
from .layer import OFTLayer


class OFTModel(TunerModel):
    prefix = "oft_"
    layer_cls = OFTLayer
    default_targets = DEFAULT_TARGETS

    def after_injection(self, config, seen) -> None:
        config.fan_in_fan_out = seen.fan_in_fan_out  # the layers correct it to their type, as PEFT does

    def check_new_adapter(self, config) -> None:
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("OFTModel supports only 1 adapter with bias. When using multiple adapters, set bias to "
                             "'none' for all adapters.")

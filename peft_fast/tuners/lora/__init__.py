"""LoRA (and its DoRA variant): the first tenant of the tuner seam, registered as peft_type "LORA"."""
from ..registry import TunerSpec, register
from . import peft_layers
from .config import LoraConfig
from .layer import LoraLinear
from .model import LoraModel

register(TunerSpec("LORA", LoraConfig, LoraModel, (LoraLinear,), peft_layers=peft_layers, card_tag="lora",
                  default=True))

__all__ = ["LoraConfig", "LoraLinear", "LoraModel"]

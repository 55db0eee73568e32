"""LoRA (and its DoRA variant): the first tenant of the tuner seam, registered as peft_type "LORA"."""
from ..registry import TunerSpec, register
from .config import LoraConfig
from .layer import LoraLinear
from .model import LoraModel

register(TunerSpec("LORA", LoraConfig, LoraModel, (LoraLinear,)))

__all__ = ["LoraConfig", "LoraLinear", "LoraModel"]
